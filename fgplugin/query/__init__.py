"""Running a query: a QuerySpec (``fgplugin.search.spec``) with its reference image or id encoded and
resolved (``execute``), and the HTML page of a result (``html``). Import from the modules."""
