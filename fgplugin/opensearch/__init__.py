"""OpenSearch k-NN support: index mapping, query compilation, request checks, the scoring script and
the OpenSearchStore.

Modules: ``mapping`` (index body, versioned names, alias swap), ``compile`` (QuerySpec -> search body,
response -> Hits, score conversions), ``scripts`` (the painless weighted-cosine script), ``checks``
(stricter-than-spec request checks), ``client`` (settings, credentials, client), ``store``
(``OpenSearchStore``). Import from the modules; nothing is loaded eagerly here (so
``python -m fgplugin.opensearch.mapping`` runs cleanly).
"""
