"""What an interrupted conversion keeps, so that running the same command again goes on from it.

``<output_dir>/conversion_state/``:

- ``state.json``: the digest of the configuration it belongs to, the measurements already made
  (perplexities, energy before the stages), each finished stage's summary, and per block-by-block
  stage the information of each finished block;
- ``<stage>/block-00007/``: a finished block's tensors (quantized projections as packed integers,
  the rest in the stored dtype) and ``hidden.safetensors``, the calibration hidden states leaving
  it, which the next block starts from (only the last block keeps them);
- ``<stage>/model/``: the whole model's tensors after a stage that is not block by block (Optimal
  Brain Spiking, activation sparsity, QAT), when another stage follows.

Every file is written atomically; a state of another configuration is refused, naming the fix.
The directory is removed once the converted model is written.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from spikellm.io import atomic_directory, atomic_write_json
from spikellm.checkpoints.shards import TensorFiles, write_tensors
from spikellm.checkpoints.weights import is_packed_tensor, read_packed, stored_tensors
from spikellm.errors import ConfigError, DataError
from spikellm.nn.spiking_linear import SpikingLinear
from spikellm.nn.storage import assign_parameters, release_packed

log = logging.getLogger(__name__)

DIRECTORY = "conversion_state"
VERSION = 1


def config_digest(cfg) -> str:
    """What a conversion's result depends on: the model, neuron, data, convert and trainer groups
    and the seed (not where it writes, how it logs, or its progress bars)."""
    from omegaconf import OmegaConf

    bound = {key: OmegaConf.to_container(cfg[key], resolve=True) if key in cfg and cfg[key] is not None and
             OmegaConf.is_config(cfg[key]) else cfg.get(key)
             for key in ("model", "neuron", "data", "convert", "trainer", "seed")}
    return hashlib.sha256(json.dumps(bound, sort_keys=True, default=str).encode()).hexdigest()


class ConversionState:
    """The state directory of one conversion (see the module docstring)."""

    def __init__(self, output_dir, digest: str, resume: bool = True):
        self.directory = Path(output_dir) / DIRECTORY
        self.digest = digest
        self.data: dict = {"version": VERSION, "digest": digest, "measured": {}, "stages": {}, "blocks": {}}
        path = self.directory / "state.json"
        if path.is_file() and not resume:
            log.info("convert.resume=false: starting afresh, removing %s", self.directory)
            shutil.rmtree(self.directory)
        elif path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise DataError(f"{path} cannot be read ({error}); remove {self.directory} or pass convert.resume=false "
                                "to start the conversion afresh") from None
            if data.get("digest") != digest:
                raise ConfigError("convert.resume", True, f"{self.directory} holds an interrupted conversion with another "
                                                          "configuration: rerun it with the same overrides to go on, "
                                                          "choose another hydra.run.dir, or pass convert.resume=false "
                                                          "to start afresh")
            self.data = data

    @property
    def resuming(self) -> bool:
        return bool(self.data["measured"] or self.data["stages"] or self.data["blocks"])

    def _save(self) -> None:
        atomic_write_json(self.directory / "state.json", self.data)

    # measurements ------------------------------------------------------------------------------
    def measured(self, key: str):
        return self.data["measured"].get(key)

    def measure(self, key: str, value) -> None:
        self.data["measured"][key] = value
        self._save()

    # stages ------------------------------------------------------------------------------------
    def stage_summary(self, name: str) -> dict | None:
        return self.data["stages"].get(name)

    def finish_stage(self, name: str, summary: dict, ctx, snapshot: bool) -> None:
        """Record ``summary`` and the activation thresholds; with ``snapshot`` (another stage
        follows) the whole model's tensors too, which replace the stage's blocks."""
        if snapshot:  # what is still in the source file stays there
            layers = _layers(ctx.model)
            records, tensors = stored_tensors(ctx.model, layers, skip_on_disk=True)
            with atomic_directory(self.directory / name / "model", overwrite=True) as tmp:
                write_tensors(tmp, tensors)
                (tmp / "layers.json").write_text(json.dumps(records))
        self.data["stages"][name] = summary
        self.data["thresholds"] = dict(ctx.thresholds)
        if snapshot:
            self.data["blocks"].pop(name, None)
        self._save()
        if snapshot:
            shutil.rmtree(self.directory / name / "blocks", ignore_errors=True)

    def describe(self) -> str:
        parts = [f"measured {', '.join(self.data['measured'])}"] if self.data["measured"] else []
        parts += [f"stage {name} finished" for name in self.data["stages"]]
        parts += [f"stage {name}: {len(infos)} blocks finished" for name, infos in self.data["blocks"].items()
                  if name not in self.data["stages"]]
        return "; ".join(parts) or "nothing finished yet"

    def interrupted(self, output_dir) -> str:
        """The line Ctrl-C ends with: what is kept, and the command that goes on from it."""
        if not self.resuming:
            return "nothing of the conversion was finished yet"
        return (f"kept in {self.directory}: {self.describe()}; run the same command with "
                f"hydra.run.dir={output_dir} to go on from there")

    # blocks ------------------------------------------------------------------------------------
    def block_infos(self, stage: str) -> dict[int, dict]:
        return {int(k): v for k, v in self.data["blocks"].get(stage, {}).items()}

    def save_block(self, stage: str, index: int, block: nn.Module, hidden: list[Tensor], info: dict) -> None:
        """Block ``index`` of ``stage`` is finished: its tensors and the hidden states leaving it."""
        records, tensors = stored_tensors(block, _layers(block))
        folder = self.directory / stage / "blocks" / f"block-{index:05d}"
        with atomic_directory(folder, overwrite=True) as tmp:
            write_tensors(tmp, tensors)
            (tmp / "layers.json").write_text(json.dumps(records))
            hidden_dir = tmp / "hidden"
            hidden_dir.mkdir()
            write_tensors(hidden_dir, ((f"batch.{i}", h) for i, h in enumerate(hidden)))
        self.data["blocks"].setdefault(stage, {})[str(index)] = info
        self._save()
        previous = self.directory / stage / "blocks" / f"block-{index - 1:05d}" / "hidden"
        shutil.rmtree(previous, ignore_errors=True)  # only the last block's hidden states are needed

    def hidden(self, stage: str) -> list[Tensor] | None:
        """The calibration hidden states entering the first unfinished block of ``stage``."""
        infos = self.block_infos(stage)
        if not infos:
            return None
        folder = self.directory / stage / "blocks" / f"block-{max(infos):05d}" / "hidden"
        files = TensorFiles(folder, fix=f"remove {self.directory} (or pass convert.resume=false) to start afresh")
        return [files.get(f"batch.{i}") for i in range(len(files.names()))]

    # restoring ---------------------------------------------------------------------------------
    @torch.no_grad()
    def restore(self, ctx, stage_order: list[str]) -> None:
        """Put back what the finished stages and blocks left on ``ctx.model``: the activation
        thresholds, the last whole-model snapshot, then the finished blocks of later stages."""
        from spikellm.models.spikify import decoder_blocks
        from spikellm.sparsity import install_thresholds

        if self.data.get("thresholds"):
            ctx.thresholds = dict(self.data["thresholds"])
            install_thresholds(ctx.model, ctx.thresholds, names=list(ctx.thresholds))
        done = [name for name in stage_order if name in self.data["stages"]]
        snapshot = next((self.directory / name / "model" for name in reversed(done)
                         if (self.directory / name / "model").is_dir()), None)
        if snapshot is not None:
            _load_into(ctx.model, snapshot)
        blocks = None
        for stage in stage_order:
            for index in sorted(self.block_infos(stage)):
                blocks = blocks if blocks is not None else decoder_blocks(ctx.model)
                _load_into(blocks[index], self.directory / stage / "blocks" / f"block-{index:05d}")

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _layers(module: nn.Module) -> dict[str, SpikingLinear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, SpikingLinear)}


def _load_into(module: nn.Module, folder: Path) -> None:
    """Read a block's (or the model's) saved tensors into it, in the dtypes it holds: a packed
    projection drops its quantizer and, in a model stored in another dtype than fp32, stays packed."""
    fix = f"remove {folder.parent} (or pass convert.resume=false) to start the conversion afresh"
    try:
        records = json.loads((folder / "layers.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{folder}/layers.json cannot be read ({error}); {fix}") from None
    files = TensorFiles(folder, fix=fix)
    packed = read_packed(files, records, folder)
    layers = _layers(module)
    dtypes = {name: t.dtype for name, t in module.state_dict().items()}
    plain = ((name, files.get(name, dtypes.get(name))) for name in files.names() if not is_packed_tensor(name, packed))
    unknown = assign_parameters(module, plain)
    if unknown:
        raise DataError(f"{folder} holds tensors the model does not have ({unknown[:3]}); {fix}")
    for name, weight in packed.items():
        layer = layers[name]
        layer.packed, layer.weight_quantizer = weight, None
        layer.rotation_folded = torch.tensor(True)
        if layer.weight.dtype == torch.float32:
            layer.weight.data = weight.dequantize()
        else:  # stored in bf16: the packed integers are its store
            release_packed(layer)
