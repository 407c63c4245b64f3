"""weightpipe the application: its config schema, the factory that maps it onto stages,
the ``weightpipe`` command, the demo and the ``bench`` sweep.

This is the only part of the library that knows the config tree; everything below it
takes typed constructor arguments.
"""
