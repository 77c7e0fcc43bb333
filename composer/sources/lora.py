"""`BASE+ADAPTER`: the base model with a PEFT LoRA adapter merged in, one tensor at a time as it is read.

The adapter is a folder (or hub id) in PEFT's format: `adapter_config.json` and `adapter_model.safetensors`
(or `.bin`) whose tensors are named after the modules they change, behind a `base_model.model.` prefix:
`<module>.lora_A.weight` (r x in) and `<module>.lora_B.weight` (out x r) for a linear layer, whose weight
gains scaling * B @ A (transposed for fan_in_fan_out, GPT-2's Conv1D); `<module>.lora_embedding_A`
(r x vocab) and `<module>.lora_embedding_B` (dim x r) for an embedding, which gains scaling * (B @ A)^T;
`<module>.lora_B.bias` (lora_bias), added scaled to the module's bias. scaling is lora_alpha / r, or
lora_alpha / sqrt(r) with use_rslora, where r and lora_alpha may be overridden per module by rank_pattern /
alpha_pattern. Anything else in the file is a whole tensor the adapter replaces: modules_to_save copies,
trained biases, and `<module>.base_layer.weight` (the embedding PEFT saves next to an embedding LoRA).

Everything is checked from the config and the file headers when the source is opened; reading a tensor
reads the base tensor and the few adapter tensors that change it, and nothing is cached.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from composer.errors import ComposerError
from composer.files import read_json_object
from composer.sources.base import TOKENIZER_FILES, FolderFilesMixin, ModelSource, TensorInfo
from composer.sources.model_files import model_file
from composer.sources.references import is_hub_id, local_path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
SAVED_PREFIX = "base_model.model."

# adapter_config.json keys whose effect is not a sum of low-rank products, so merging would be wrong
NOT_MERGEABLE = {
    "use_dora": "DoRA (it rescales the merged weight's columns by learned magnitudes)",
    "layer_replication": "layer_replication (it changes the layer stack)",
    "target_parameters": "target_parameters (LoRA on raw parameters such as MoE experts)",
    "alora_invocation_tokens": "activated LoRA (it applies only after its invocation tokens)",
    "use_qalora": "QA-LoRA (its A factor acts on pooled inputs)",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing between adapters",
    "trainable_token_indices": "trainable tokens",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
}
# initialisations that rewrite the base weights: such an adapter only fits the rewritten base
MODIFIED_BASE_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass(frozen=True)
class Delta:
    """scaling * (B @ A), transposed when `transposed`; with no `b`, scaling * A (a LoRA bias)."""

    a: str
    b: str | None
    scaling: float
    transposed: bool = False


@dataclass
class TensorEdit:
    """What the adapter does to one base tensor: replace it, then add low-rank deltas."""

    replacement: str | None = None
    deltas: list[Delta] = field(default_factory=list)


class AdapterWeights:
    """One adapter weights file, opened lazily: shapes from the header, tensors on demand."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".safetensors":
            from composer.safetensors_header import read_header

            header = read_header(path)
            self.shapes = {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}
            self._state = None
        else:
            from composer.sources.folder import load_mapped

            self._state = {name: value for name, value in load_mapped(path).items() if isinstance(value, torch.Tensor)}
            self.shapes = {name: tuple(value.shape) for name, value in self._state.items()}
        self._handle = None

    def read(self, name: str) -> torch.Tensor:
        if self._state is not None:
            return self._state[name].to(torch.float32, copy=True)
        from safetensors import SafetensorError, safe_open

        try:
            if self._handle is None:
                self._handle = safe_open(str(self.path), framework="pt")
            # a copy: safe_open hands out views of its map, which an in-place merge must never touch
            return self._handle.get_tensor(name).to(torch.float32, copy=True)
        except (SafetensorError, OSError) as error:
            raise ComposerError(f"{self.path}: adapter tensor '{name}' could not be read ({error}).") from None

    def close(self) -> None:
        self._handle = None
        self._state = None


def read_adapter_config(folder: Path) -> dict:
    path = model_file(folder, ADAPTER_CONFIG, weights=True)
    if path is None:
        raise ComposerError(f"Adapter folder {folder} has no {ADAPTER_CONFIG}; a PEFT adapter folder needs one.")
    config = read_json_object(path)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ComposerError(f"{path}: peft_type is {peft_type}; composer merges LoRA adapters only (peft_type LORA).")
    for key, what in NOT_MERGEABLE.items():
        if config.get(key):
            raise ComposerError(f"{path} uses {what} ('{key}'), which composer cannot merge into the base weights.")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(MODIFIED_BASE_INITS):
        raise ComposerError(
            f"{path}: the adapter was initialised with '{init}', which rewrites the base weights, so it only fits that "
            "rewritten base. Convert it to a plain LoRA (PEFT's path_initial_model_for_weight_conversion) first."
        )
    for key in ("r", "lora_alpha"):
        _check_positive(path, key, config.get(key))
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise ComposerError(
                f"{path}: '{key}' must map module name patterns to numbers (got {type(patterns).__name__})."
            )
        for pattern, value in patterns.items():
            _check_positive(path, f"{key}.{pattern}", value)
    return config


def _check_positive(path: Path, key: str, value: object) -> None:
    # JSON's NaN and Infinity parse as floats: a NaN scaling would write NaN into every merged tensor
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ComposerError(f"{path}: '{key}' must be a positive number (got {value!r}).")


def pattern_value(patterns: dict, module: str, default: float, where: str) -> float:
    """PEFT's per-module override: the first pattern that matches the end of the module name (at a dot)."""
    for pattern, value in (patterns or {}).items():
        try:
            matched = re.match(rf"(.*\.)?({pattern})$", module)
        except re.error as error:
            raise ComposerError(f"{where}: pattern '{pattern}' is not a valid regular expression ({error}).") from None
        if matched:
            return value
    return default


def adapter_weights_file(folder: Path) -> Path:
    for name in ADAPTER_WEIGHTS:
        path = model_file(folder, name, weights=True)
        if path is not None:
            return path
    raise ComposerError(f"Adapter folder {folder} has neither {' nor '.join(ADAPTER_WEIGHTS)}.")


# adapter tensor-name suffix -> its role in the module's update
ROLES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "bias",
    ".lora_embedding_A": "embedding_A",
    ".lora_embedding_B": "embedding_B",
}


class AdapterMerge:
    """Every base tensor the adapter changes, and how; built from the config and headers, refusing anything unclear."""

    def __init__(self, config: dict, weights: AdapterWeights, base_infos: dict[str, TensorInfo], base_reference: str):
        self.config_path = weights.path.parent / ADAPTER_CONFIG
        self.weights = weights
        self.base_infos = base_infos
        self.base_reference = base_reference
        self.edits: dict[str, TensorEdit] = {}
        self.keeps_ties = bool(config.get("ensure_weight_tying"))
        factors: dict[str, dict[str, str]] = {}  # module -> role -> adapter tensor
        for saved in weights.shapes:
            name = saved.removeprefix(SAVED_PREFIX)
            suffix = next((s for s in ROLES if name.endswith(s)), None)
            if suffix is not None:
                factors.setdefault(name[: -len(suffix)], {})[ROLES[suffix]] = saved
            elif ".lora_" in name:
                raise ComposerError(
                    f"{weights.path}: adapter tensor '{saved}' is a kind of LoRA tensor composer does not know how to merge."
                )
            else:
                self._replacement(saved, name.replace(".base_layer.", "."))
        for module, roles in factors.items():
            self._low_rank(module, roles, config)

    def _fail(self, saved: str, problem: str) -> ComposerError:
        return ComposerError(f"{self.weights.path}: adapter tensor '{saved}' {problem}")

    def _base_info(self, saved: str, target: str) -> TensorInfo:
        info = self.base_infos.get(target)
        if info is None:
            tied = (
                " (the base may tie it to the embeddings, so it has no tensor of its own)"
                if "lm_head" in target
                else ""
            )
            raise self._fail(
                saved, f"changes '{target}', which base model '{self.base_reference}' does not have{tied}."
            )
        return info

    def _replacement(self, saved: str, target: str) -> None:
        if target not in self.base_infos and self.keeps_ties:
            return  # PEFT's copy of a tied head: the base ties it to the embeddings, which stay tied in the output
        info = self._base_info(saved, target)
        if self.weights.shapes[saved] != info.shape:
            raise self._fail(
                saved,
                f"has shape {list(self.weights.shapes[saved])} but replaces '{target}' of shape {list(info.shape)}.",
            )
        self.edits.setdefault(target, TensorEdit()).replacement = saved

    def _low_rank(self, module: str, roles: dict[str, str], config: dict) -> None:
        shapes = self.weights.shapes
        target = module + ".weight"
        kind = "embedding_" if "embedding_A" in roles or "embedding_B" in roles else ""
        first = next(iter(roles.values()))
        if kind and roles.keys() & {"A", "B", "bias"}:
            raise self._fail(first, f"mixes linear and embedding LoRA factors for module '{module}'.")
        a_saved, b_saved = roles.get(kind + "A"), roles.get(kind + "B")
        if a_saved is None or b_saved is None:
            missing = "lora_B" if a_saved is not None else "lora_A"
            raise self._fail(
                first, f"has no matching {missing} tensor for module '{module}', so the adapter file is incomplete."
            )
        info = self._base_info(a_saved, target)
        rank = pattern_value(config.get("rank_pattern"), module, config["r"], f"{self.config_path} rank_pattern")
        alpha = pattern_value(
            config.get("alpha_pattern"), module, config["lora_alpha"], f"{self.config_path} alpha_pattern"
        )
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        a_shape, b_shape = shapes[a_saved], shapes[b_saved]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != rank or b_shape[1] != rank:
            raise self._fail(
                a_saved,
                f"and '{b_saved}' have shapes {list(a_shape)} and {list(b_shape)}, but {self.config_path.name} gives module "
                f"'{module}' rank {rank} (A must be rank x in, B out x rank).",
            )
        transposed = bool(kind) or bool(config.get("fan_in_fan_out"))
        product = (a_shape[1], b_shape[0]) if transposed else (b_shape[0], a_shape[1])
        if product != info.shape:
            raise self._fail(
                a_saved,
                f"and '{b_saved}' make a {list(product)} update, but '{target}' in the base has shape {list(info.shape)}.",
            )
        edit = self.edits.setdefault(target, TensorEdit())
        edit.deltas.append(Delta(a_saved, b_saved, scaling, transposed))
        if "bias" in roles:
            bias_target = module + ".bias"
            bias_info = self._base_info(roles["bias"], bias_target)
            if shapes[roles["bias"]] != bias_info.shape:
                raise self._fail(
                    roles["bias"],
                    f"has shape {list(shapes[roles['bias']])} but '{bias_target}' has {list(bias_info.shape)}.",
                )
            self.edits.setdefault(bias_target, TensorEdit()).deltas.append(Delta(roles["bias"], None, scaling))

    def apply(self, target: str, base: torch.Tensor | None) -> torch.Tensor:
        """The merged tensor, computed in float32 and returned in the base tensor's dtype."""
        edit = self.edits[target]
        dtype = self.base_infos[target].dtype
        merged = self.weights.read(edit.replacement) if edit.replacement else base.float()
        for delta in edit.deltas:
            if delta.b is None:
                merged += delta.scaling * self.weights.read(delta.a)
                continue
            product = self.weights.read(delta.b) @ self.weights.read(delta.a)
            merged += delta.scaling * (product.T if delta.transposed else product)
        return merged.to(dtype)


class _AdapterFolderFiles(FolderFilesMixin):
    """Tokenizer and licence files an adapter folder may carry."""

    def __init__(self, reference: str, folder: Path, weights_path: Path):
        self.reference = reference
        self.folder = folder
        self.weight_paths = (weights_path,)


class LoraSource(ModelSource):
    """A base model source with an adapter merged into the tensors it hands out."""

    def __init__(self, reference: str, base: ModelSource, adapter_folder: Path, adapter_reference: str):
        super().__init__(reference)
        self.base = base
        self.folder = adapter_folder
        self.adapter_reference = adapter_reference
        config = read_adapter_config(adapter_folder)
        self._weights = AdapterWeights(adapter_weights_file(adapter_folder))
        self.merge = AdapterMerge(config, self._weights, base.tensor_infos(), base.reference)
        self._adapter_files = _AdapterFolderFiles(adapter_reference, adapter_folder, self._weights.path)

    def tensor_infos(self) -> dict[str, TensorInfo]:
        return self.base.tensor_infos()

    def read(self, name: str) -> torch.Tensor:
        if name not in self.merge.edits:
            return self.base.read(name)
        base = None if self.merge.edits[name].replacement else self.base.read(name)
        return self.merge.apply(name, base)

    def config(self) -> dict:
        return self.base.config()

    def _tokenizer_owner(self):
        return self._adapter_files if self._adapter_files.has_tokenizer() else self.base

    def has_tokenizer(self) -> bool:
        return self._tokenizer_owner().has_tokenizer()

    def save_tokenizer(self, destination: Path) -> list[str]:
        return self._tokenizer_owner().save_tokenizer(destination)

    def license(self) -> str | None:
        known = {value for value in (self.base.license(), self._adapter_files.license()) if value}
        return known.pop() if len(known) == 1 else None

    def input_paths(self) -> dict[str, Path]:
        """Every local file or folder this source reads (an output must not land inside one)."""
        return self.base.input_paths() | {f"the adapter '{self.adapter_reference}'": self.folder}

    def close(self) -> None:
        self._weights.close()
        self.base.close()


def _names_location(text: str, relative_to: Path | None) -> bool:
    return local_path(text, relative_to).exists() or is_hub_id(text)


def _names_model(text: str, relative_to: Path | None) -> bool:
    """A model reference: a path, a hub id, or itself MODEL+ADAPTER."""
    return _names_location(text, relative_to) or any(_names_model(base, relative_to) for base, _ in _splits(text))


def _splits(reference: str) -> list[tuple[str, str]]:
    """(base, adapter) for each '+', the last '+' first."""
    places = [i for i, character in enumerate(reference) if character == "+" and 0 < i < len(reference) - 1]
    return [(reference[:i], reference[i + 1 :]) for i in reversed(places)]


def split_reference(reference: str, relative_to: Path | None = None) -> tuple[str, str]:
    """BASE+ADAPTER -> (BASE, ADAPTER), at the last '+' whose left part is a model (preferring an adapter that exists)."""
    candidates = [(base, adapter) for base, adapter in _splits(reference) if _names_model(base, relative_to)]
    for base, adapter in candidates:
        if _names_location(adapter, relative_to):
            return base, adapter
    if candidates:
        return candidates[0]
    raise ComposerError(
        f"Model path '{reference}' does not exist, and no part of it before a '+' is a model folder or hub id, "
        "so it is not a BASE+ADAPTER reference either."
    )


def fetch_hub_adapter(reference: str) -> Path:
    """The hub snapshot folder holding an adapter's config, weights and any tokenizer files."""
    from composer.sources.hub import download, split_revision

    repo_id, revision = split_revision(reference)
    folder = download(reference, repo_id, revision, [ADAPTER_CONFIG, "README.md", *TOKENIZER_FILES])
    for name in ADAPTER_WEIGHTS:
        if not (folder / name).is_file():
            folder = download(reference, repo_id, folder.name, [name])  # folder.name: the snapshot's commit
        if (folder / name).is_file():
            return folder
    return folder  # opening it says which files are missing


def adapter_folder(adapter: str, reference: str, relative_to: Path | None) -> Path:
    path = local_path(adapter, relative_to)
    if path.is_dir():
        return path
    if path.is_file():
        return path.parent
    if is_hub_id(adapter):
        return fetch_hub_adapter(adapter)
    raise ComposerError(
        f"Adapter '{adapter}' (in '{reference}') does not exist and is not a hub id of the form org/name."
    )


def open_with_adapter(reference: str, relative_to: Path | None, open_base) -> LoraSource:
    """`BASE+ADAPTER` as one source; `open_base(reference, relative_to)` opens the base (composer.sources.open_source,
    handed in so that this module never imports the dispatcher that imports it)."""
    base_reference, adapter = split_reference(reference, relative_to)
    folder = adapter_folder(adapter, reference, relative_to)
    base = open_base(base_reference, relative_to)
    try:
        return LoraSource(reference, base, folder, adapter)
    except BaseException:
        base.close()
        raise
