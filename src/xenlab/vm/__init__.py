"""The toolstack: run guests described by xl configs, with QEMU as hypervisor and device model.

- ``image``: the project's guest image (Debian kernel, busybox initramfs, qemu-ga).
- ``qemu``: DomainConfig -> QEMU command line (pure), accelerator probing.
- ``qmp``: QMP sessions through qemu.qmp, errors turned into BackendError.
- ``store``: the SQLite state store (domains, snapshots) and per-domain locks.
- ``domain``: the lifecycle verbs (create, list, destroy, shutdown, ...); tapped vifs
  are brought online (``xenlab.hotplug``) before QEMU starts and offline when it goes.
- ``network``: network-attach / -detach / -list on running domains.
"""
