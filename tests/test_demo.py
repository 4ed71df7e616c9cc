"""``modekernels demo`` and ``modekernels adapt``: end to end on tiny models (CPU, seconds)."""

import json
import math

import pytest
import torch

from modekernels.cli import main
from modekernels.demo.methods import METHODS
from modekernels.demo.run import DEMO_METHODS, run_demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    lines = []
    results = run_demo(quick=True, seed=3, out=str(out), progress=False, log=lines.append)
    return out, results, lines


def test_quick_demo_runs_every_method_and_writes_json_and_png(quick_run):
    out, results, lines = quick_run
    assert [r.method for r in results] == list(DEMO_METHODS)
    assert not any(line.startswith("skipped") for line in lines)
    with open(out / "tradeoff.png", "rb") as file:
        assert file.read(8) == PNG_MAGIC
    saved = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in saved["methods"]] == list(DEMO_METHODS)
    assert saved["settings"]["seed"] == 3 and saved["settings"]["skipped"] == {}
    table = "\n".join(lines)
    for row in saved["methods"]:
        assert row["method"] in table
        for key in ("original_before", "original_after", "new_before", "new_after", "train_tokens_per_s"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["method"], key)
        assert row["forgetting"] == pytest.approx(row["original_after"] - row["original_before"])
        assert row["gain"] == pytest.approx(row["new_before"] - row["new_after"])
        assert row["backend"]
    rows = {row["method"]: row for row in saved["methods"]}
    # every method starts from the same pretrained model
    assert len({(row["original_before"], row["new_before"]) for row in rows.values()}) == 1
    assert rows["full"]["added_parameters"] == 0 and rows["full"]["gain"] > 0
    base = rows["full"]["base_parameters"]
    for method in ("lora", "adapter", "neutral-residues", "adamix"):
        assert 0.05 * base < rows[method]["added_parameters"] < 0.15 * base, method
    # neutral residues run on the modekernels op; the reference backend on the CPU
    assert "neutral_residue=reference" in rows["neutral-residues"]["backend"]
    # MoDE routes original-domain sequences to the backbone alone: no forgetting
    assert rows["mode"]["original_after"] == pytest.approx(rows["mode"]["original_before"], abs=1e-6)


def test_quick_demo_is_deterministic_for_a_seed(quick_run, tmp_path):
    _, first, _ = quick_run
    methods = ["full", "neutral-residues", "mode"]
    second = run_demo(quick=True, seed=3, out=str(tmp_path), progress=False, log=lambda line: None, methods=methods)
    first = {r.method: r for r in first}
    for again in second:
        before = first[again.method]
        assert (again.original_after, again.new_after, again.added_parameters) == (
            before.original_after, before.new_after, before.added_parameters
        ), again.method


def test_demo_cli_reuses_the_cached_pretrained_model(quick_run, capsys):
    out, _, _ = quick_run
    assert main(["demo", "--quick", "--seed", "3", "--out", str(out), "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "(cached)" in printed and "neutral-residues" in printed
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["pretrained_from_cache"] is True
    assert saved["settings"]["adapt"]["steps"] == 2


# --------------------------------------------------------------------------- adapt

CODE = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(120))
PROSE = "".join(f"Paragraph {i} tells a short story about a river and a town.\n\n" for i in range(120))


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("texts")
    (root / "code.txt").write_text(CODE)
    (root / "prose.txt").write_text(PROSE)
    return root / "code.txt", root / "prose.txt"


def _tiny_gpt2(vocab_size: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2, activation_function="gelu",
                        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    return GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny GPT-2 saved without tokenizer files (adapt falls back to the byte tokenizer)."""
    path = tmp_path_factory.mktemp("ckpt")
    _tiny_gpt2(258).save_pretrained(path)
    return path


SAVED_FILES = {
    "full": "model.safetensors",
    "lora": "adapter_config.json",
    "adapter": "modules.safetensors",
    "neutral-residues": "modules.safetensors",
    "adamix": "modules.safetensors",
    "mode": "modules.safetensors",
    "moefy": "modules.safetensors",
}


@pytest.mark.parametrize("method", list(METHODS))
def test_adapt_saves_modules_and_reports_losses(method, checkpoint, texts, tmp_path, capsys):
    code, prose = texts
    out = tmp_path / "out"
    argv = ["adapt", "--model", str(checkpoint), "--new-domain", str(code), "--original-domain", str(prose),
            "--method", method, "--out", str(out), "--steps", "3", "--block-size", "32", "--batch-size", "4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "new domain loss" in printed and "original domain loss" in printed
    assert (out / SAVED_FILES[method]).is_file()
    report = json.loads((out / "adapt_report.json").read_text())
    assert report["method"] == method and report["tokenizer"].startswith("byte tokenizer")
    for when in ("losses_before", "losses_after"):
        assert set(report[when]) == {"new", "original"}
        assert all(math.isfinite(v) and v > 0 for v in report[when].values())
    if method != "full":
        assert report["added_parameters"] > 0


@pytest.mark.parametrize("method", ["neutral-residues", "adamix", "mode", "moefy"])
def test_adapted_modules_load_back_into_the_checkpoint(method, checkpoint, texts, tmp_path):
    """The checkpoint plus the saved modules give the adapted model's new-domain loss."""
    from transformers import AutoModelForCausalLM

    from modekernels.demo.corpora import ByteTokenizer, text_file_corpus
    from modekernels.demo.train import evaluate
    from modekernels.hf import load_modules

    code, _ = texts
    out = tmp_path / "out"
    argv = ["adapt", "--model", str(checkpoint), "--new-domain", str(code), "--method", method,
            "--out", str(out), "--steps", "2", "--block-size", "32", "--batch-size", "4", "--eval-blocks", "8"]
    assert main(argv) == 0
    host = AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True)
    loaded = load_modules(host, str(out))
    assert loaded.moved and not loaded.refused
    tokenizer = ByteTokenizer()
    new = text_file_corpus(str(code), tokenizer.encode, tokenizer.eos_id, 32, max_eval_blocks=8)
    loss = evaluate(host, new.eval, batch_size=4, device=torch.device("cpu"))
    report = json.loads((out / "adapt_report.json").read_text())
    assert loss == pytest.approx(report["losses_after"]["new"], rel=1e-6)
    assert loss != pytest.approx(report["losses_before"]["new"], rel=1e-6)


def test_adapt_uses_the_checkpoints_own_tokenizer(texts, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    code, _ = texts
    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator([CODE], trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", eos_token="<eos>")
    path = tmp_path / "ckpt"
    tokenizer.save_pretrained(path)
    _tiny_gpt2(len(tokenizer)).save_pretrained(path)
    out = tmp_path / "out"
    argv = ["adapt", "--model", str(path), "--new-domain", str(code), "--method", "lora",
            "--out", str(out), "--steps", "2", "--block-size", "16"]
    assert main(argv) == 0
    report = json.loads((out / "adapt_report.json").read_text())
    assert report["tokenizer"].endswith(f"from {path}") and set(report["losses_after"]) == {"new"}


def test_adapt_builds_a_model_from_a_config(texts, tmp_path):
    code, prose = texts
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "vocab_size": 258, "hidden_size": 32,
                                  "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                  "num_key_value_heads": 2, "max_position_embeddings": 64}))
    out = tmp_path / "out"
    argv = ["adapt", "--config", str(config), "--new-domain", str(code), "--original-domain", str(prose),
            "--method", "neutral-residues", "--out", str(out), "--steps", "2", "--block-size", "32"]
    assert main(argv) == 0
    assert (out / "modules.json").is_file()


@pytest.mark.parametrize(
    "change, named",
    [
        ({"--new-domain": "missing.txt"}, "--new-domain"),
        ({"--original-domain": "missing.txt"}, "--original-domain"),
        ({"--method": "dropout"}, "--method"),
        ({"--model": "."}, "--model"),
        ({"--steps": "0"}, "--steps"),
    ],
)
def test_adapt_rejects_bad_arguments_naming_them(change, named, checkpoint, texts, tmp_path, capsys):
    code, _ = texts
    args = {"--model": str(checkpoint), "--new-domain": str(code), "--method": "lora", "--out": str(tmp_path / "o")}
    args.update(change)
    argv = ["adapt"] + [item for pair in args.items() for item in pair]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert named in error and "error" in error
    assert not (tmp_path / "o").exists()


def test_cli_rejects_missing_arguments_and_bad_demo_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["adapt", "--new-domain", "x.txt", "--method", "lora", "--out", "o"])
    assert exit_info.value.code == 2 and "--model" in capsys.readouterr().err
    assert main(["demo", "--steps", "0", "--out", "unused"]) == 2
    assert "--steps" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["demo", "--device", "cuda", "--out", "unused"]) == 2
        assert "--device cuda" in capsys.readouterr().err


def test_large_config_is_the_gpu_budget_and_excludes_quick():
    from modekernels.demo.run import demo_config

    large = demo_config(large=True)
    assert large.spec.hidden > demo_config().spec.hidden
    assert large.adapt.steps > demo_config().adapt.steps
    with pytest.raises(ValueError, match="--quick and --large"):
        demo_config(quick=True, large=True)
