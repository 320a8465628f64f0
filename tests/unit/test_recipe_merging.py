"""Skill merging and merged-model export on a tiny real Llama (PEFT and transformers, CPU):
what can be merged (check_merge's 400s), that `cat` is exactly the weighted sum of the
adapters' updates, that a TIES result is an adapter registration accepts, and that an exported
merged model computes what base + adapter computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapters.base_model import BaseModelInfo, ensure_default_model
from adapters.errors import InvalidInput
from adapters.training.export import EXPORT_INFO, export_merged
from adapters.training.merging import MergeError, Source, check_merge, merge_adapters
from adapters.validation import AdapterLimits, sha256_file, validate_adapter

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "models"
NAME = "tiny-llama"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with the default model's tokenizer (needed by the export)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(str(ensure_default_model(CACHE)))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True, torch_dtype="float32")
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def make_lora(base: Path, out: Path, r: int, seed: int,
              targets: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """A PEFT adapter with random A and B (so its update is not zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                      init_lora_weights=False))
    model.peft_config["default"].base_model_name_or_path = NAME
    model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    return out


def deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """Each target module's update B @ A * alpha / r."""
    from safetensors.torch import load_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    return {k.removesuffix(".lora_A.weight"): weights[k.replace("lora_A", "lora_B")] @ v * scale
            for k, v in weights.items() if k.endswith(".lora_A.weight")}


def source(model: str, rank: int, weight: float = 1.0, base: str | None = NAME) -> Source:
    return Source(model=model, weight=weight, rank=rank, target_modules=("q_proj",),
                  base_model=base)


@pytest.mark.parametrize(("method", "sources", "density", "param", "needle"), [
    ("ties", [source("a@1", 8), source("b@1", 16)], 0.5, "merge.sources", "one rank"),
    ("cat", [source("a@1", 8), source("b@1", 16)], None, "merge.method", "24"),
    ("ties", [source("a@1", 8), source("b@1", 8)], None, "merge.density", "density"),
    ("linear", [source("a@1", 8), source("b@1", 8)], 0.5, "merge.density", "density"),
    ("linear", [source("a@1", 8), source("a@1", 8)], None, "merge.sources", "twice"),
    ("linear", [source("a@1", 8, 0.0), source("b@1", 8, 0.0)], None, "merge.sources", "0"),
    ("linear", [source("a@1", 8, base="x/one"), source("b@1", 8, base="x/two")], None,
     "merge.sources", "different base"),
])
def test_what_cannot_be_merged_is_a_clear_400(method: str, sources: list[Source],
                                              density: float | None, param: str,
                                              needle: str) -> None:
    with pytest.raises(InvalidInput) as err:
        check_merge(method, sources, density, max_lora_rank=16)
    assert err.value.param == param and needle in err.value.message


def test_what_can_be_merged_gives_the_result_rank() -> None:
    assert check_merge("ties", [source("a@1", 8), source("b@1", 8)], 0.5, 16) == 8
    assert check_merge("cat", [source("a@1", 8), source("b@1", 8, base=None)], None, 16) == 16


def test_cat_is_exactly_the_weighted_sum_of_the_updates(tiny_model: Path, tmp_path: Path) -> None:
    a = make_lora(tiny_model, tmp_path / "a", r=4, seed=1)
    b = make_lora(tiny_model, tmp_path / "b", r=8, seed=2)
    merged = merge_adapters(tiny_model, [a, b], [0.7, 0.3], "cat", tmp_path / "merged",
                            base_model_name=NAME)
    config = json.loads((merged / "adapter_config.json").read_text())
    assert config["r"] == 12 and config["base_model_name_or_path"] == NAME
    assert sorted(p.name for p in merged.iterdir()) == ["adapter_config.json",
                                                        "adapter_model.safetensors"]
    da, db, dm = deltas(a), deltas(b), deltas(merged)
    assert set(dm) == set(da) == set(db)
    for key, value in dm.items():
        torch.testing.assert_close(value, 0.7 * da[key] + 0.3 * db[key], rtol=1e-4, atol=1e-6)


def test_a_ties_merge_is_an_adapter_registration_accepts(tiny_model: Path,
                                                         tmp_path: Path) -> None:
    a = make_lora(tiny_model, tmp_path / "a", r=8, seed=1)
    b = make_lora(tiny_model, tmp_path / "b", r=8, seed=2, targets=("q_proj", "k_proj"))
    merged = merge_adapters(tiny_model, [a, b], [1.0, 1.0], "ties", tmp_path / "merged",
                            base_model_name=NAME, density=0.5)
    config = json.loads((merged / "adapter_config.json").read_text())
    assert config["r"] == 8 and set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj"}
    checked = validate_adapter(merged, BaseModelInfo.from_folder(tiny_model),
                               AdapterLimits(16, 10**9))
    assert checked.spec.rank == 8
    # Trimmed to half: about half of each update's entries are zero before the product.
    assert any(not torch.equal(v, deltas(a).get(k, v)) for k, v in deltas(merged).items())


def test_rslora_sources_are_refused(tiny_model: Path, tmp_path: Path) -> None:
    a = make_lora(tiny_model, tmp_path / "a", r=4, seed=1)
    b = make_lora(tiny_model, tmp_path / "b", r=4, seed=2)
    config = json.loads((b / "adapter_config.json").read_text())
    (b / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    with pytest.raises(MergeError, match="rsLoRA"):
        merge_adapters(tiny_model, [a, b], [1.0, 1.0], "linear", tmp_path / "m",
                       base_model_name=NAME)


def test_an_exported_model_computes_what_base_plus_adapter_computes(tiny_model: Path,
                                                                    tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = make_lora(tiny_model, tmp_path / "a", r=4, seed=3)
    out = tmp_path / "export"
    files = export_merged(tiny_model, adapter, out, {"adapter": "a@1"})
    assert {"config.json", "model.safetensors", "tokenizer.json", EXPORT_INFO} <= set(files)
    for rel, meta in files.items():
        assert meta == {"size": (out / rel).stat().st_size, "sha256": sha256_file(out / rel)}
    assert json.loads((out / EXPORT_INFO).read_text()) == {"adapter": "a@1"}
    assert not list(tmp_path.glob(".export*"))  # written aside, renamed into place

    ids = AutoTokenizer.from_pretrained(str(out))("Hello there, pirate!",
                                                  return_tensors="pt")["input_ids"]
    exported = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model)),
                                          str(adapter)).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, reference(ids).logits,
                                   rtol=1e-4, atol=1e-4)
        plain = AutoModelForCausalLM.from_pretrained(str(tiny_model)).eval()(ids).logits
    assert not torch.allclose(plain, reference(ids).logits, atol=1e-4)  # the adapter matters
