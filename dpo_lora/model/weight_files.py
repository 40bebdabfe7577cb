"""Reading and writing a model folder's safetensors shards one tensor at a time."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dpo_lora.core.errors import UserError


def tensor_files(folder: Path) -> list[Path]:
    """The safetensors files of a Hugging Face model folder (one, or the shards of its index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise UserError(f"{folder}: no model.safetensors (or index) in it; export needs a local safetensors model")


class WeightFolder:
    """name -> tensor, read from the folder's memory-mapped shards only when asked for."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self.shard_of = {}
        for file in tensor_files(folder):
            shard = safe_open(str(file), framework="pt")
            self.shard_of.update(dict.fromkeys(shard.keys(), shard))

    def __contains__(self, name: str) -> bool:
        return name in self.shard_of

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.shard_of[name].get_tensor(name)

    def names(self) -> list[str]:
        return list(self.shard_of)

    def shape(self, name: str) -> list[int]:
        """A tensor's shape from its shard's header, nothing read."""
        return self.shard_of[name].get_slice(name).get_shape()


class ShardWriter:
    """Collects tensors into safetensors shards of at most `max_bytes` and writes the index."""

    def __init__(self, out: Path, max_bytes: int) -> None:
        self.out, self.max_bytes = out, max_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + size > self.max_bytes:
            self._flush()
        self.current[name] = tensor.contiguous()
        self.current_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.current, str(self.out / f"part-{len(self.shards):05d}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.current))
        self.current, self.current_bytes = {}, 0

    def close(self) -> list[Path]:
        if self.current:
            self._flush()
        if len(self.shards) == 1:
            (self.out / "part-00000.tmp").rename(self.out / "model.safetensors")
            return [self.out / "model.safetensors"]
        names = [f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors" for i in range(len(self.shards))]
        for i, name in enumerate(names):
            (self.out / f"part-{i:05d}.tmp").rename(self.out / name)
        weight_map = {tensor: names[i] for i, shard in enumerate(self.shards) for tensor in shard}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return [self.out / name for name in names]
