"""conclab: thread pools vs coroutines, measured.

The package is layered; each layer imports only the ones below it::

    conclab          the ``conclab`` command (cli) and ``conclab demo`` (demo)
    analysis         tables, charts, findings and the HTML report of a run
    reliability      ``conclab check``: hostile and failing peers against live servers
    experiments      ``conclab run``: the experiment registry, the experiments, and harness/
    loadgen          ``conclab load``: closed, open and hold load over the lab protocol
    servers          the protocol, the session, one module per concurrency model, the launcher

The folders are the repository's top level (``servers/``, ``loadgen/``, ...);
installed, they live under this one ``conclab`` package (docs/architecture.md).
"""
