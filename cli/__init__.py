"""The fgplugin command-line app (installed as ``fgplugin_cli``): a thin layer over the library."""
