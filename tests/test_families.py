"""The model family seam (families/): each family is one module of differences, chosen once from params.json,
and a new family is a module plus one registration, with no generic module naming a family."""

import dataclasses
import os
import re

import pytest
import torch

from llama_mp import LlamaMPError, families
from llama_mp.checkpoints import layout
from llama_mp.checkpoints.params import parse_params
from llama_mp.families import llama3
from llama_mp.runtime.decode import choose_decoder
from llama_mp.runtime.tools import tool_format

SHAPE = {"dim": 64, "n_layers": 2, "n_heads": 4}


def test_each_family_is_one_module_registered_once():
    assert families.names() == ["llama", "llama3", "llama4"]
    for family in families.FAMILIES:
        assert family is __import__(f"llama_mp.families.{family.name}", fromlist=["FAMILY"]).FAMILY
    with pytest.raises(ValueError, match="registered twice"):
        families.register(families.named("llama3"))
    with pytest.raises(LlamaMPError, match="Unknown model family 'llama5'; llama_mp knows llama, llama3, llama4"):
        families.named("llama5")


def test_params_json_chooses_the_family_newest_first():
    assert parse_params(SHAPE).family == "llama"
    assert parse_params({**SHAPE, "vocab_size": llama3.LLAMA3_VOCAB}).family == "llama3"
    assert parse_params({**SHAPE, "use_scaled_rope": True}).family == "llama3"
    assert parse_params({**SHAPE, "nope_layer_interval": 4, "use_scaled_rope": True}).family == "llama4"
    assert families.family_of(None) is families.named("llama")  # a folder without params: the common layout


def test_every_pointer_of_a_family_names_code_that_exists():
    for family in families.FAMILIES:
        refs = [family.tokenizer_class, family.chat_format] + [ref for ref in (family.layout, family.layers) if ref]
        for ref in refs:
            assert families.piece(ref) is not None, (family.name, ref)
        assert families.piece(family.tokenizer_class).family == family.name


@pytest.fixture
def toy_family(monkeypatch):
    """A made-up family registered beside the others: Llama 3 with theta 1234, its embedding split by
    columns, a 64-position context, pythonic tools by default and no C kernels."""
    toy = dataclasses.replace(
        llama3.FAMILY, name="toy", title="Toy", identifies=lambda args: args.rope_theta == 1234.0,
        split_dims={**llama3.FAMILY.split_dims, "tok_embeddings.weight": 1}, max_context=lambda args: 64,
        tools=dataclasses.replace(llama3.TOOLS, default_format="python_list"),
        cpu_kernels_problem="toy kernels were never written", synth_params={"rope_theta": 1234.0})
    monkeypatch.setattr(families, "FAMILIES", families.FAMILIES + [toy])
    return toy


def test_a_new_family_is_one_registration_away(toy_family):
    args = parse_params({**SHAPE, "vocab_size": 256, **toy_family.synth_params})
    assert args.family == "toy" and args.max_context == 64
    assert parse_params({**SHAPE, "use_scaled_rope": True}).family == "llama3"
    assert layout.split_dim("tok_embeddings.weight", args) == 1
    assert layout.split_dim("tok_embeddings.weight", args.with_vocab(llama3.LLAMA3_VOCAB)) == 1
    assert tool_format(None, "toy") == "python_list"
    with pytest.raises(LlamaMPError, match=r"cannot run Toy \(toy kernels were never written\)"):
        choose_decoder("cpu_kernels", torch.device("cpu"), torch.float32, family="toy")


# A family name compared, or a table keyed by family names, in a generic module (the seam's rule).
FAMILY_BRANCH = re.compile(r"""(==|!=) *['"]llama[34]?['"]|['"]llama[34]?['"] *(==|!=)|in \(['"]llama[34]?['"]"""
                           r"""|llama4 is (not )?None|['"]llama[34]?['"]: """)
# The family's own implementation modules, which the Family objects point at.
OWN_MODULES = {"checkpoints/llama4.py", "checkpoints/hf_llama4.py", "runtime/llama4.py", "runtime/llama4_tokenizer.py"}


def test_no_generic_module_branches_on_a_family_name():
    root = os.path.dirname(os.path.dirname(families.__file__))  # llama_mp/
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, root).replace(os.sep, "/")
            if not name.endswith(".py") or relative.startswith("families/") or relative in OWN_MODULES:
                continue
            with open(path, encoding="utf-8") as f:
                found += [f"{relative}:{n}: {line.strip()}" for n, line in enumerate(f, 1) if FAMILY_BRANCH.search(line)]
    assert found == []
