"""mergekit-multi files: several YAML documents, each a merge with a `name:`, read as one recipe with `stages:`.

A document uses another by naming it where a model goes. The documents become stages in an order where
each comes after the ones it uses (the file's order where it allows); the output is the one document
without a `name:`, or else the one no other document uses. The composed graph of the stages is kept, so
errors still name the line of the key at fault.
"""

from __future__ import annotations

from typing import Any

import yaml

from composer.errors import ComposerError
from composer.yaml_text import parse_yaml_documents

# where a document names another: a model, or the model its tokenizer comes from (`tokenizer.source` too)
MODEL_KEYS = ("model", "base_model", "path", "tokenizer_source", "source")


def _names_used(value: Any, names: set[str]) -> set[str]:
    """The document names that `value` gives where a model goes (at any depth)."""
    used: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            if key in MODEL_KEYS and isinstance(item, str) and item in names:
                used.add(item)
            used |= _names_used(item, names)
    elif isinstance(value, list):
        for item in value:
            used |= _names_used(item, names)
    return used


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _in_use_order(named: list[tuple[yaml.Node, dict]], uses: dict[str, set[str]], source_name: str) -> list:
    """The named documents, each after those it uses (file order where free); a cycle is an error."""
    ordered, placed, waiting = [], set(), list(named)
    while waiting:
        ready = next((doc for doc in waiting if uses[doc[1]["name"]] <= placed), None)
        if ready is None:
            cycle = ", ".join(f"'{doc[1]['name']}' (line {_line(doc[0])})" for doc in waiting)
            raise ComposerError(
                f"{source_name}: the documents {cycle} use one another in a circle; each may use only "
                "documents that do not use it."
            )
        waiting.remove(ready)
        ordered.append(ready)
        placed.add(ready[1]["name"])
    return ordered


def recipe_documents(text: str, source_name: str) -> tuple[yaml.Node | None, Any]:
    """The recipe's graph and data: a one-document file as it is, a mergekit-multi file as a `stages:` recipe."""
    documents = parse_yaml_documents(text, source_name)
    if len(documents) > 1:  # an empty document, as a `---` closing the file makes, holds no merge
        documents = [document for document in documents if document[1] is not None] or documents[:1]
    if len(documents) <= 1:
        return documents[0] if documents else (None, None)
    for number, (root, data) in enumerate(documents, 1):
        if not isinstance(data, dict):
            raise ComposerError(
                f"{source_name}, line {_line(root)}: document {number} of the file is not a mapping of "
                "merge keys; each document of a multi-document file is one merge with a 'name:'."
            )
        name = data.get("name", "unnamed")
        if not isinstance(name, str) or not name:
            raise ComposerError(
                f"{source_name}, line {_line(root)}: the 'name' of document {number} must be text, the name later "
                "documents use where a model goes."
            )
    unnamed = [document for document in documents if "name" not in document[1]]
    if len(unnamed) > 1:
        lines = ", ".join(str(_line(root)) for root, _ in unnamed)
        raise ComposerError(
            f"{source_name}: the documents at lines {lines} have no 'name:'. In a multi-document file "
            "every merge but the final one needs a name, which later documents use as a model."
        )
    named = [document for document in documents if "name" in document[1]]
    names = {str(data["name"]) for _, data in named}
    uses = {data["name"]: _names_used({k: v for k, v in data.items() if k != "name"}, names) for _, data in named}
    ordered = _in_use_order(named, uses, source_name)
    if not unnamed:
        used = set().union(*uses.values())
        finals = [document for document in ordered if document[1]["name"] not in used]
        if len(finals) > 1:
            listed = ", ".join(f"'{data['name']}' (line {_line(root)})" for root, data in finals)
            raise ComposerError(
                f"{source_name}: no document uses {listed}, so each would be a final model; composer "
                "writes one model a recipe. Keep one final merge (or name the others where a model goes)."
            )
        ordered = [document for document in ordered if document is not finals[0]] + finals
    key = yaml.ScalarNode("tag:yaml.org,2002:str", "stages", ordered[0][0].start_mark, ordered[0][0].start_mark)
    stages = yaml.SequenceNode("tag:yaml.org,2002:seq", [root for root, _ in ordered], key.start_mark, key.end_mark)
    output_root, output_data = unnamed[0] if unnamed else (None, {})
    root = yaml.MappingNode(
        "tag:yaml.org,2002:map",
        [(key, stages)] + (output_root.value if output_root else []),
        key.start_mark,
        key.end_mark,
    )
    return root, {"stages": [data for _, data in ordered], **output_data}
