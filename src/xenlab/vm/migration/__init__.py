"""Moving a domain's state: xl save/restore and live migration, one package.

``image`` is the save-image and VM-state-file format (pure, on file
descriptors); ``channel`` the control connection between two hosts and the
receiver's token; ``wire`` the protocol's messages as values; ``peerconfig``
what a receiver takes from its peer; ``saverestore`` xl save and restore;
``sender`` xl migrate; ``receiver`` the destination.  The verbs here reach the
hypervisor only through ``vm.backend`` (QEMU's side: ``vm.backends.qemu.save``
and ``.migration``).  The protocol and its threat model are in docs/migration.md.
This file imports nothing, so the format can be used without the verbs.
"""
