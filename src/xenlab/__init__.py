"""xenlab: an open toolkit for Xen-style virtualization work.

The rooms are subpackages (see docs/architecture.md): ``config`` parses the xl
domain-configuration language; ``cli`` is the ``xenlab`` command.
"""

__version__ = "0.1.0"
