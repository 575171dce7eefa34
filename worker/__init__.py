"""The wanps worker library: `Optimizer` for your own training loop, `Observer` to follow a model."""
from wanps.rpc.auth import ClientSecurity
from wanps.worker.io_loop import Interrupted
from wanps.worker.observer import Observer
from wanps.worker.optimizer import Optimizer

__all__ = ["ClientSecurity", "Interrupted", "Observer", "Optimizer"]
