"""Prompts for router gates: read from files, or picked from a corpus by their meaning with sentence-transformers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from composer.errors import ComposerError
from composer.files import SMALL_FILE_LIMIT, YAML_FILE_LIMIT, read_text
from composer.yaml_text import parse_yaml


def read_prompt_file(path: Path) -> dict[str, list[str]]:
    """Prompts grouped by name. A `.txt` file holds one prompt a line (one group, named after the file);
    a YAML or JSON file holds a list of prompts, or a mapping of group name -> list of prompts."""
    structured = path.suffix.lower() in (".yml", ".yaml", ".json")
    text = read_text(path, "Prompt file", YAML_FILE_LIMIT if structured else SMALL_FILE_LIMIT)
    if structured:
        data = parse_yaml(text, f"Prompt file {path}")[1]
    else:
        data = [line.strip() for line in text.splitlines() if line.strip()]
    groups = {path.stem: data} if isinstance(data, list) else data
    if not isinstance(groups, dict):
        raise ComposerError(
            f"Prompt file {path} must hold a list of prompts or a mapping of group name to a list of prompts."
        )
    for name, prompts in groups.items():
        if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ComposerError(f"Prompt file {path}: group '{name}' must be a list of non-empty strings.")
    groups = {str(name): prompts for name, prompts in groups.items() if prompts}
    if not groups:
        raise ComposerError(f"Prompt file {path} holds no prompts.")
    return groups


def load_sentence_model(reference: str | None):
    """A sentence-transformers model: the packaged all-MiniLM-L6-v2 (offline) by default, else a folder or hub id."""
    from sentence_transformers import SentenceTransformer

    if reference is None:
        from composer.packages import minilm_dir

        reference = str(minilm_dir())
    try:
        return SentenceTransformer(reference, device="cpu")
    except (OSError, ValueError) as error:
        raise ComposerError(
            f"Recipe key 'prompt_model': sentence-transformers cannot load '{reference}' ({str(error).splitlines()[0]})."
        ) from None


@dataclass
class Selection:
    """The corpus prompts picked for each expert, best match first, with their cosine similarity."""

    picked: list[list[tuple[str, float]]] = field(default_factory=list)


def select_prompts(descriptions: list[str | None], corpus: list[str], per_expert: int, model) -> Selection:
    """Each corpus prompt goes to the described expert whose description it is most similar to (so no two
    experts share a prompt); each expert keeps its `per_expert` most similar prompts."""
    import torch

    described = [i for i, text in enumerate(descriptions) if text]
    selection = Selection([[] for _ in descriptions])
    if not described:
        return selection
    encoded = model.encode(
        [descriptions[i] for i in described] + corpus, convert_to_tensor=True, normalize_embeddings=True
    )
    encoded = encoded.float().cpu()
    similarity = encoded[len(described) :] @ encoded[: len(described)].T  # [corpus, described experts]
    owner = similarity.argmax(1)
    for column, expert in enumerate(described):
        mine = torch.nonzero(owner == column).flatten()
        order = mine[similarity[mine, column].argsort(descending=True)][:per_expert]
        selection.picked[expert] = [(corpus[i], similarity[i, column].item()) for i in order.tolist()]
    return selection
