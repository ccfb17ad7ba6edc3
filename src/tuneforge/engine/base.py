"""The base model that the systems of one process share (engine/pool.py): its model, the lock that lets one pass
run at a time, its dynamic batcher, and the adapters loaded onto it, at most `max_adapters`, the least recently
used unloaded first."""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from pathlib import Path

BASE_ROW = "__base__"  # PEFT's name for a row of a mixed batch that uses no adapter
# per base: an r=16 all-linear adapter of an 8B base is ~80 MB in bf16 (16 of them ~1.3 GB, 8% of the base)
DEFAULT_MAX_ADAPTERS = 16


def weights_file(folder: str) -> Path | None:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (Path(folder) / name).exists():
            return Path(folder) / name
    return None


def adapter_key(folder: str) -> tuple:
    """What identifies an adapter's weights: its folder and its weights file's size and time (retrained in place
    is a new adapter)."""
    weights = weights_file(folder)
    stat = weights.stat() if weights is not None else None
    return (str(Path(folder).resolve()), stat.st_mtime_ns if stat else 0, stat.st_size if stat else 0)


def mixable(folder: str | None) -> bool:
    """Whether rows of this adapter (None: the base alone) may share a batch with rows of other adapters: PEFT mixes
    plain LoRA adapters only."""
    if folder is None:
        return True
    import json

    try:
        config = json.loads((Path(folder) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return config.get("peft_type", "LORA") == "LORA" and not config.get("use_dora")


class Base:
    """One base model shared by every engine on it: the model (a PeftModel once an adapter is loaded), the lock
    that lets one forward pass run at a time, the dynamic batcher, and the adapters loaded, coldest first."""

    def __init__(self, model, name: str = "base", max_adapters: int = DEFAULT_MAX_ADAPTERS):
        self.model = model.eval()
        self.name = name
        self.device = next(model.parameters()).device
        self.lock = threading.Lock()  # one generate call at a time: batched requests and whole eval sets take turns
        self.max_batch = 16  # for the batcher: most concurrent conversations in one generate call
        self.max_adapters = max_adapters  # loaded at once on this base; loading one more unloads the coldest
        self.slots: OrderedDict[tuple, str] = OrderedDict()  # adapter_key -> PEFT adapter name, least recent first
        self.mixable: dict[str, bool] = {}  # PEFT adapter name -> may share a batch with other adapters
        self.loads = 0  # adapters loaded so far (reloads included), for tests and benchmarks
        self._named = 0
        self._batcher = None
        self._batcher_lock = threading.Lock()

    def batcher(self):
        with self._batcher_lock:
            if self._batcher is None:
                from tuneforge.engine.batcher import Batcher

                self._batcher = Batcher(self, max_batch=self.max_batch)
            return self._batcher

    @property
    def has_adapters(self) -> bool:
        return bool(self.slots)

    def loaded(self) -> list[str]:
        """The adapter folders loaded now, coldest first."""
        return [key[0] for key in self.slots]

    def prepare(self, folders: list[str | None]) -> dict:
        """Under `lock`: each row's adapter loaded (None: the base alone), the least recently used beyond the budget
        unloaded, and the keyword arguments that make the model's next pass use them."""
        keys = [adapter_key(f) if f is not None else None for f in folders]
        for key in dict.fromkeys(k for k in keys if k is not None):
            self._load(key, keep={k for k in keys if k is not None})
        if not self.has_adapters:
            return {}
        names = [self.slots[k] if k is not None else BASE_ROW for k in keys]
        if all(self.mixable.get(n, True) for n in names):
            return {"adapter_names": names}
        (only,) = set(names)  # the batcher gives an unmixable adapter batches of its own
        self.model.set_adapter(only, inference_mode=True)
        return {}

    def _load(self, key: tuple, keep: set) -> None:
        if key in self.slots:
            self.slots.move_to_end(key)
            return
        from peft import PeftModel

        self._named += 1
        name = f"adapter{self._named}"
        folder = key[0]
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(folder, adapter_name=name, is_trainable=False)
        else:
            self.model = PeftModel.from_pretrained(self.model, folder, adapter_name=name, is_trainable=False)
        self.model.eval()
        config = self.model.peft_config[name]
        self.mixable[name] = str(getattr(config.peft_type, "value", config.peft_type)) == "LORA" and not getattr(
            config, "use_dora", False
        )
        for stale in [k for k in self.slots if k[0] == key[0]]:  # the same folder's earlier weights
            self._unload(stale)
        self.slots[key] = name
        self.loads += 1
        for cold in [k for k in self.slots if k not in keep][: max(0, len(self.slots) - self.max_adapters)]:
            self._unload(cold)

    def _unload(self, key: tuple) -> None:
        name = self.slots.pop(key)
        self.mixable.pop(name, None)
        with warnings.catch_warnings():  # "adapter X was active which is now deleted": no adapter is active here
            warnings.simplefilter("ignore")
            self.model.delete_adapter(name)


class AdapterModel:
    """A pooled system's model for direct forward passes (teacher-forced scoring in eval): the shared base with
    this system's adapter, or with adapters off, one pass at a time. Anything else is the base model's."""

    def __init__(self, base: Base, adapter: str | None):
        self._base, self._adapter = base, adapter

    def __call__(self, *args, **kwargs):
        rows = (kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape[0]
        with self._base.lock:
            extra = self._base.prepare([self._adapter] * rows)
            return self._base.model(*args, **kwargs, **extra)

    def __getattr__(self, name):
        return getattr(self._base.model, name)
