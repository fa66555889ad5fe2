"""OpenSearch k-NN support: index mapping, query compilation, request checks, the scoring script,
the OpenSearchStore and the ML Commons wiring.

Modules: ``mapping`` (index body, versioned names, alias swap), ``compile`` (QuerySpec -> search body,
response -> Hits, score conversions), ``scripts`` (the painless weighted-cosine script), ``checks``
(stricter-than-spec request checks), ``client`` (settings, credentials, client), ``store``
(``OpenSearchStore``), and the package ``mlcommons`` (connector, model and pipelines that let the
cluster call ``fgplugin serve`` itself). Import from the modules; nothing is loaded eagerly here (so
``python -m fgplugin.opensearch.mapping`` runs cleanly).
"""
