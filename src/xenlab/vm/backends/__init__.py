"""The implementations of :class:`xenlab.vm.backend.Backend`: one package each (qemu/ now)."""
