"""The wire contract between sites and server: task names and DXO keys (:mod:`~splitunet.wire.protocol`), the
model settings both halves build from (:mod:`~splitunet.wire.model_config`), the self-describing tensor encodings
(:mod:`~splitunet.wire.codec`) and the one place where tensors become DXOs and back
(:mod:`~splitunet.wire.transport`). Site-side and server-side code both import this package, never each other.
"""
