"""Let OpenSearch call the encoder itself: ML Commons connector + model, ingest and search pipelines,
the stored scoring script and a mustache search template, all generated from an export's model card.

Modules (import from them; nothing is loaded here):

- ``names``: the registered objects' names per model version, the document fields, ``WiringError``;
- ``inputs``: ``WiringOptions`` and what the bodies derive from the model card (layout, fixed query);
- ``templates``: the search pipeline's ``${...}`` query template and the mustache search template;
- ``bodies``: the ML Commons request bodies (connector, model, ingest and search pipelines);
- ``simulate``: what ML Commons does with those bodies, offline (connector payload, pipelines);
- ``checks``: the project's checks of the bodies where the API spec has no schema;
- ``settings``: the ML Commons cluster settings the connector needs;
- ``plan``: every request of the setup in order, and writing them to files;
- ``apply``: registering it all on a cluster, idempotently, and removing it again.
"""
