import os

import torch

# Without a GPU, Triton kernels run in the interpreter; this must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from letter_ext._backend import has_compiled_op, triton_usable  # noqa: E402

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def available_backends(op: str, device: str = "cpu") -> list[str]:
    """Non-reference backends of `op` that can run on `device` here."""
    dev = torch.device(device)
    out = []
    if has_compiled_op(op, dev.type):
        out.append(dev.type)
    if triton_usable(dev):
        out.append("triton")
    return out


def forced_isas() -> list[str]:
    """Every instruction set of the C++ CPU kernels that this machine runs (empty without them)."""
    from letter_ext import supported_isas

    return supported_isas()


@pytest.fixture
def force_isa(request):
    """Run the test with the C++ CPU kernels forced onto request.param's ISA; restores the default."""
    import letter_ext

    before = letter_ext.isa()
    letter_ext.set_isa(request.param)
    yield request.param
    letter_ext.set_isa(before)


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def shared_data():
    path = os.path.abspath(SHARED_DATA)
    if not os.path.isdir(path):
        pytest.skip(f"real data not present at {path}")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest single-threaded: on a shared 2-core CPU a second OpenMP thread only
    adds barrier waits. Restores the thread count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def full_disk_savefig(monkeypatch):
    """A call that makes matplotlib's Figure.savefig write part of its file, then fail as a full
    disk does (tests of atomic plot writes; skipped without matplotlib)."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    def full_disk(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG partial")
        raise OSError(28, "No space left on device", fname)

    return lambda: monkeypatch.setattr(Figure, "savefig", full_disk)


# -- a tiny local causal LM for LC-Rec (tests/test_lcrec.py, tests/test_lcrec_train.py) ---------

TINY_LLAMA_WORDS = (
    "below is an instruction that describes a task . write response appropriately completes the request "
    "### instruction: response: here are user's historical interactions: , try to predict next item").split()


def make_tiny_llama(path, *, tie: bool = False, extra_rows: int = 3) -> str:
    """A random 2-layer Llama (d 32) with a word-level tokenizer, saved to the folder `path`
    (nothing downloaded). extra_rows: embedding rows beyond the tokenizer's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<pad>"] + sorted(set(TINY_LLAMA_WORDS))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>")
    config = LlamaConfig(vocab_size=len(words) + extra_rows, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_factory():
    """make_tiny_llama as a fixture (skips when transformers/peft are not installed)."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    return make_tiny_llama


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_factory, tmp_path_factory) -> str:
    """Folder of a tiny untied random Llama + tokenizer."""
    return tiny_llama_factory(tmp_path_factory.mktemp("llama"), tie=False)


# A pipeline config small enough for tests (seconds on one CPU thread); used by test_pipeline*.py.
TINY_PIPELINE = {
    "data": {"synthetic": {"num_users": 300, "num_items": 120, "num_categories": 6, "seed": 0}},
    "embed": {"model": "hash"},
    "cf": {"epochs": 3, "patience": 2},
    "tokenizer": {"layers": [64, 32], "codebook_sizes": [16, 16, 16], "epochs": 10, "batch_size": 128,
                  "kmeans_iters": 10, "clusters": 4},
    "rec": {"d_model": 32, "num_layers": 1, "num_decoder_layers": 1, "num_heads": 2, "d_kv": 16, "d_ff": 64,
            "epochs": 2, "batch_size": 128, "eval_every": 1, "valid_users": 50},
    "evaluate": {"num_beams": 10},
}


def _write_tiny_config(folder) -> str:
    import yaml

    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_PIPELINE))
    return str(path)


@pytest.fixture
def tiny_config(tmp_path):
    """TINY_PIPELINE as a YAML file."""
    return _write_tiny_config(tmp_path)


@pytest.fixture(scope="module")
def tiny_config_module(tmp_path_factory):
    """TINY_PIPELINE as a YAML file shared by a module's tests."""
    return _write_tiny_config(tmp_path_factory.mktemp("tiny-config"))


def torchrun_train_rec(config, data: str, codes: str, out, timeout: int) -> dict:
    """`letter train-rec` with `config` under 2-process torchrun (gloo on CPU); its summary.json."""
    import json
    import subprocess
    import sys

    settings = out.parent / f"{out.name}.rec.json"
    settings.write_text(json.dumps(config.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LETTER_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "letter.cli.main", "train-rec", "--data", data, "--index", codes, "--out", str(out),
           "--config", str(settings)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


# -- a tiny synthetic dataset and a TIGER trained on it (tests/test_rec.py, tests/test_serve.py) ---

NUM_ITEMS, NUM_CATEGORIES = 80, 8


def small_config(**overrides):
    """RecConfig of a TIGER small enough to train in seconds on one CPU thread."""
    from letter.rec import RecConfig

    base = dict(d_model=32, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=16, d_ff=64, max_history=5,
                epochs=6, batch_size=64, lr=3e-3, warmup_ratio=0.05, eval_every=2, valid_users=0, seed=3)
    return RecConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """A small synthetic dataset on disk, and codes = (latent category, rank within category)."""
    import numpy as np

    from letter.data import make_synthetic, write_letter

    ds = make_synthetic(num_users=300, num_items=NUM_ITEMS, num_categories=NUM_CATEGORIES, min_length=5, max_length=10, seed=0)
    folder = str(tmp_path_factory.mktemp("synth"))
    write_letter(ds, folder)
    category = np.array([t["category"] for t in ds.item_text])
    within = np.zeros(NUM_ITEMS, dtype=np.int64)
    for c in range(NUM_CATEGORIES):
        within[category == c] = np.arange((category == c).sum())
    codes = np.stack([category, within], 1)
    codes_path = os.path.join(folder, "codes.npy")
    np.save(codes_path, codes)
    return folder, codes_path, codes, ds


@pytest.fixture(scope="session")
def trained(synth, tmp_path_factory):
    """(run folder, summary) of small_config() trained on `synth` (single-threaded)."""
    from letter.rec import train_rec

    folder, codes_path, _, _ = synth
    out = str(tmp_path_factory.mktemp("rec") / "run")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = train_rec(small_config(), folder, codes_path, out)
    finally:
        torch.set_num_threads(before)
    return out, summary
