"""The search side's contracts and the embedded store: the query language (``spec``: QuerySpec, filters,
hits), the ``Store`` base every store implements (``store``) and the embedded DuckDB store
(``embedded``). ``fgplugin.opensearch`` implements the same ``Store``; ``fgplugin.stores`` picks one
from a URL. Import from the modules."""
