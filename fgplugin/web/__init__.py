"""`fgplugin explore`: a web page over a store (pick an item or upload a photo, weight attributes, filter,
see the hits with their cosines, labels and attention maps). ``app.create_app`` builds the ASGI app."""
