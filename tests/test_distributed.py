"""DDP under `accelerate launch`: 2 CPU processes (gloo) x micro_batch_size 1 train exactly like
1 process x micro_batch_size 2, and a 2-process checkpoint refuses to resume in 1 process. Also
FSDP2 (forced on for CPU, see FORCE_FSDP2) with a sharded 4-bit base gives the same run and saves
a normal, full peft adapter, on either kind of CPU (AS_AVX512BF16).

On a machine without GPUs, `accelerate launch --multi_gpu --num_processes 2` starts 2 CPU processes
through torchrun with the gloo backend. (`--cpu --num_processes 2` does *not*: without an mpirun
hostfile Accelerate's simple launcher starts a single process.)
"""

import json
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from qlora.model.trainable import untrained_adapters

from conftest import ROOT

TINY = ["--model", "random:tiny", "--quant", "none", "--compute_dtype", "float32", "--optimizer", "adamw",
        "--lora_dropout", "0", "--max_seq_len", "256", "--grad_accum", "2", "--max_steps", "3", "--warmup_steps", "0",
        "--lr", "1e-3", "--tracker", "none", "--sample_prompts", "0", "--eval_every", "0", "--eval_batches", "1",
        "--save_every", "2", "--recompute", "true"]

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU/gloo test; on GPUs --multi_gpu uses NCCL")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def launch(n: int, *args):
    return run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port()), "train.py", *args])


def train_losses(out):
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["supervised_tokens"]) for r in recs if r["kind"] == "train"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    one, two = tmp / "one", tmp / "two"
    r1 = run([sys.executable, "train.py", *TINY, "--micro_batch_size", "2", "--output_dir", str(one)])
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = launch(2, *TINY, "--micro_batch_size", "1", "--output_dir", str(two))
    assert r2.returncode == 0, r2.stderr[-3000:]
    return one, two


def test_two_processes_equal_one_process_with_twice_the_micro_batch(runs):
    one, two = runs
    l1, l2 = train_losses(one), train_losses(two)
    assert sorted(l1) == sorted(l2) == [1, 2, 3]  # the main process alone writes the log: no duplicates
    for step in l1:
        assert l1[step][1] == l2[step][1], step  # same rows: the all-reduced supervised-token count agrees
        # fp32, same rows; only the summation order differs (one batch of 2 rows vs. 2 ranks' sums
        # all-reduced): observed ~2e-7 relative. 1e-5 is 50x that, far below a wrong-data or
        # wrong-scaling error (>= 1e-3 relative at these loss values).
        assert l2[step][0] == pytest.approx(l1[step][0], rel=1e-5, abs=0), step
    a = load_file(str(one / "final" / "adapter_model.safetensors"))
    b = load_file(str(two / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    moved = 0
    for k in a:
        scale = a[k].abs().max().item()
        # Adam divides by sqrt(v): a gradient element near 0 turns fp32 rounding noise into a
        # visible update difference, so compare against each tensor's scale (observed ~1e-5 of it).
        assert (a[k] - b[k]).abs().max().item() <= 1e-3 * scale, k
        moved += "lora_B" in k and scale > 0
    assert moved  # lora_B starts at 0: the adapters really trained


def test_checkpoint_rng_has_one_state_per_rank(runs):
    _, two = runs
    rng = torch.load(two / "checkpoint-2" / "rng.pt", weights_only=True)
    assert set(rng) == {"rank0", "rank1"}
    assert json.loads((two / "checkpoint-2" / "meta.json").read_text())["world_size"] == 2


def test_resume_two_process_checkpoint_with_one_process_fails_clearly(runs):
    _, two = runs
    r = run([sys.executable, "train.py", *TINY, "--micro_batch_size", "1", "--output_dir", str(two),
             "--resume", "auto", "--max_steps", "4"])
    assert r.returncode == 2, r.stderr[-3000:]
    err = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in r.stderr
    assert "written by 2 processes, this run has 1" in err[0]
    assert (two / "checkpoint-2" / "meta.json").is_file()  # nothing lost


# Accelerate enables FSDP only on accelerators; this launcher forces its FSDP2 path (the same
# `fsdp2_prepare_model`, per-decoder-layer `fully_shard`, no_sync and clipping) onto gloo CPU
# processes started by torchrun, so train.py's FSDP code paths run in CI without GPUs.
FORCE_FSDP2 = """
import os, runpy, sys
sys.path.insert(0, os.getcwd())
import accelerate, accelerate.state
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = accelerate.Accelerator.__init__

def init(self, *a, **kw):
    _init(self, *a, **kw)
    self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        reshard_after_forward=True, state_dict_type="SHARDED_STATE_DICT", cpu_ram_efficient_loading=False)

accelerate.Accelerator.__init__ = init
accelerate.state.AcceleratorState.distributed_type = property(lambda self: DistributedType.FSDP, lambda self, v: None)
"""

# bitsandbytes decides per Linear4bit, from the CPU's flags, whether an eval-mode forward repacks the
# weight for its AVX512-BF16 kernel (after which no gradient flows through the layer and it computes in
# bf16; qlora.model.quant's guard turns that off). Taking that decision on every CPU makes AVX2-only machines
# run what AVX512-BF16 ones do. Under FSDP every 4-bit linear runs its own forward (no fused node).
AS_AVX512BF16 = """
import os, runpy, sys
sys.path.insert(0, os.getcwd())
import bitsandbytes as bnb
_l4_init = bnb.nn.Linear4bit.__init__

def l4_init(self, *a, **kw):
    _l4_init(self, *a, **kw)
    self.support_avx512bf16_for_cpu = True

bnb.nn.Linear4bit.__init__ = l4_init
"""
RUN_TRAIN = """
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


def test_fsdp2_with_sharded_4bit_base_equals_one_process(tmp_path):
    """Both runs evaluate at step 0 (eval_batches 1), so the FSDP run's 4-bit linears meet an eval pass
    before training: unguarded, step 1's loss was 10.827981 (bf16 repacked weights) against 10.818958
    in one process, and the gradient norm 0.81 against 1.28. Guarded, the losses are bitwise equal."""
    # quant_storage float32 = the compute dtype here (bfloat16 on GPUs): FSDP shards the packed 4-bit weights
    nf4 = TINY + ["--quant", "nf4", "--quant_storage", "float32"]  # the later --quant wins
    one, fsdp = tmp_path / "one", tmp_path / "fsdp"
    (tmp_path / "one_process.py").write_text(AS_AVX512BF16 + RUN_TRAIN)
    r1 = run([sys.executable, str(tmp_path / "one_process.py"), *nf4, "--micro_batch_size", "2", "--output_dir", str(one)])
    assert r1.returncode == 0, r1.stderr[-3000:]
    (tmp_path / "force_fsdp2.py").write_text(AS_AVX512BF16 + FORCE_FSDP2 + RUN_TRAIN)
    r2 = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
              str(tmp_path / "force_fsdp2.py"), *nf4, "--micro_batch_size", "1", "--sample_prompts", "1",
              "--output_dir", str(fsdp)])
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "samples: skipped under FSDP" in r2.stderr  # generating on rank 0 alone would hang
    l1, l2 = train_losses(one), train_losses(fsdp)
    assert sorted(l1) == sorted(l2) == [1, 2, 3]
    evals = [json.loads(line) for line in (fsdp / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["kind"] == "eval"][0] == 0  # an eval pass before step 1
    for step in l1:
        assert l1[step][1] == l2[step][1]
        # same rows, fp32; only the summation order can differ (rank sums all-reduced; observed:
        # bitwise equal). An eval pass that repacked the weights moved step 1 by 8e-4.
        assert l2[step][0] == pytest.approx(l1[step][0], rel=1e-5, abs=0), step
    assert untrained_adapters(load_file(str(fsdp / "final" / "adapter_model.safetensors"))) == []
    for sub in ("final", "checkpoint-2"):  # the gathered adapter: full tensors, the usual peft keys
        a = load_file(str(one / sub / "adapter_model.safetensors"))
        b = load_file(str(fsdp / sub / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and a
        for k in a:
            assert a[k].shape == b[k].shape, k
            assert (a[k] - b[k]).abs().max().item() <= 1e-3 * a[k].abs().max().item(), k
