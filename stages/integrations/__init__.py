"""weightpipe inside other systems' weight-sync interfaces, one subpackage per system.

Each subpackage imports the system it plugs into (``verl``: the checkpoint-engine backend
and the SGLang rollout updater), so nothing here is imported by ``weightpipe.stages``
itself; a user names the subpackage in that system's configuration.
"""

__all__: list[str] = []
