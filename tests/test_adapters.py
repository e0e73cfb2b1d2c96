"""What mlx_lm.lora trains and keeps beyond LoRA on every linear: ``lora_parameters.keys``,
dropout, DoRA and full fine-tuning (estimator.adapter_terms), from the census of each
block's linears.

The pure tests build a census by hand (a Llama block: q, k, v read the block's normed input,
o the attention's output, gate and up the MLP's input, down the MLP's product) and check
each term against what mlx-lm's tuner keeps, derived here by hand. The census test takes a
real one (mlx-lm's own model, in a child Python), and the trainable counts are checked
against mlx-lm's own modules in another child Python."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from pytest_yourai.census import BlockKind, Census, EstimateRefused, LinearInfo, census_for
from pytest_yourai.estimator import TrainingShape, adapter_terms, estimate_training_memory
from tests.helpers import TINY_LLAMA_CONFIG

H, W, KV = 64, 128, 32  # hidden, intermediate (MLP width), k/v width
LAYERS = 3
ARCH = {**TINY_LLAMA_CONFIG, "hidden_size": H, "intermediate_size": W, "num_attention_heads": 2,
        "num_key_value_heads": 1, "num_hidden_layers": LAYERS}  # fmt: skip
PATHS = {  # path: (in, out, reads)
    "self_attn.q_proj": (H, H, "self_attn:64"),
    "self_attn.k_proj": (H, KV, "self_attn:64"),
    "self_attn.v_proj": (H, KV, "self_attn:64"),
    "self_attn.o_proj": (H, H, "self_attn.o_proj"),
    "mlp.gate_proj": (H, W, "mlp:64"),
    "mlp.up_proj": (H, W, "mlp:64"),
    "mlp.down_proj": (W, H, "mlp.down_proj"),
}


def census(bits: int = 16, dtype: str = "float32") -> Census:
    linears = tuple(
        LinearInfo(path, i, o, 0, bits < 16, i + o, reads) for path, (i, o, reads) in PATHS.items()
    )
    block = BlockKind(
        count=LAYERS, attention=True, mixer=(), mlp="gated",
        lora_rank1=sum(lin.rank1 for lin in linears), attention_width=H + 2 * KV, heads=2,
        intermediate=W, parameters=sum(i * o for i, o, _ in PATHS.values()) + 2 * H,
        linears=linears,
    )  # fmt: skip
    return Census(model_type="llama", bits=bits, group_size=64, dtype=dtype,
                  weights_bytes=10**6, total_parameters=10**5, blocks=(block,), hidden_size=H,
                  vocab_size=256)  # fmt: skip


SHAPE = TrainingShape(bits=16, dtype="float32", batch_size=2, seq_len=32, lora_rank=4,
                      lora_layers=2, backend="cpu", in_flight="bounded")  # fmt: skip
T = SHAPE.batch_size * SHAPE.seq_len
QKVO = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


def peak(shape: TrainingShape, c: Census | None = None) -> float:
    return estimate_training_memory(ARCH, shape, c or census()).mlx_peak_gb * 1e9


def test_keys_leave_out_the_inputs_and_adapters_of_the_linears_not_chosen() -> None:
    # Adapters on q, k, v and o only: the MLP's two inputs (gate/up's, down's) are no longer
    # copied to float32, and gate, up and down train no adapters (LoRA weights, gradients
    # and Adam's two moments: 4 float32 values per parameter).
    dropped_inputs = T * (H + W) * 4 * SHAPE.lora_layers
    dropped_adapters = SHAPE.lora_rank * ((H + W) * 2 + (W + H)) * SHAPE.lora_layers * 4 * 4
    difference = peak(SHAPE) - peak(replace(SHAPE, lora_keys=QKVO))
    assert difference == pytest.approx(dropped_inputs + dropped_adapters, rel=1e-9)


def test_a_partial_group_still_keeps_its_shared_input() -> None:
    # q and v (mlx-lm's example keys) read the one input q, k and v share: it is kept.
    terms = adapter_terms(census(), replace(SHAPE, lora_keys=("self_attn.q_proj",
                                                              "self_attn.v_proj")), 2)  # fmt: skip
    kept_others = T * (H + H + W) * 4 * 2  # o's, gate/up's and down's inputs are dropped
    assert terms.graph_bytes == pytest.approx(-kept_others)
    assert terms.elements == 4 * ((H + H) + (H + KV)) * 2


def test_dropout_keeps_a_product_and_a_mask_per_linear() -> None:
    terms = adapter_terms(census(), replace(SHAPE, lora_dropout=0.1), 2)
    per_linear = sum(T * i * 5 for i, _, _ in PATHS.values())
    shared = T * (H + H + H + W) * 4
    assert terms.graph_bytes == pytest.approx((per_linear - shared) * 2)


def test_dora_keeps_outputs_and_on_a_quantized_model_the_dequantized_weights() -> None:
    outputs = sum(T * o for _, o, _ in PATHS.values())
    dense = adapter_terms(census(), replace(SHAPE, fine_tune_type="dora"), 2)
    assert dense.graph_bytes == pytest.approx(outputs * 4 * 2)
    shape4 = replace(SHAPE, fine_tune_type="dora", bits=4, dtype="bfloat16")
    quantized = adapter_terms(census(bits=4, dtype="bfloat16"), shape4, 2)
    weights = sum(i * o for i, o, _ in PATHS.values())
    assert quantized.graph_bytes == pytest.approx((outputs + weights) * 2 * 2)
    # The learned magnitudes (one per output, float32) train beside the adapters.
    lora = adapter_terms(census(), replace(SHAPE, lora_keys=tuple(PATHS)), 2)
    assert dense.elements - lora.elements == sum(o for _, o, _ in PATHS.values()) * 2


def test_full_fine_tuning_trains_the_blocks_weights_in_their_dtype() -> None:
    shape = replace(SHAPE, fine_tune_type="full", dtype="bfloat16", optimizer="adamw")
    terms = adapter_terms(census(dtype="bfloat16"), shape, 2)
    assert terms.elements == census().blocks[0].parameters * 2
    assert (terms.element_bytes, terms.new_bytes) == (2.0, 0.0)
    assert terms.optimizer_elements == 2 * terms.elements
    # Inputs kept in bfloat16 for the weights' gradients, not LoRA's float32 copies.
    assert terms.graph_bytes == pytest.approx(-T * (H + H + H + W) * 2 * 2)


def test_full_fine_tuning_peaks_at_the_update_when_gradients_outweigh_activations() -> None:
    # Two tokens: the activations are tiny, so the step's peak is the optimizer's update:
    # the weights, old and new Adam state, and the new trained weights.
    shape = replace(SHAPE, fine_tune_type="full", batch_size=1, seq_len=2)
    c = census()
    trained = c.blocks[0].parameters * 2 * 4
    assert peak(shape, c) == pytest.approx(c.weights_bytes + 2 * 2 * trained + trained)


def test_what_is_not_modeled_is_refused_by_name() -> None:
    with pytest.raises(EstimateRefused, match="census of its linears"):
        adapter_terms(replace(census(), blocks=(replace(census().blocks[0], linears=()),)),
                      replace(SHAPE, lora_keys=QKVO), 2)  # fmt: skip
    moe = census()
    switch = replace(moe.blocks[0], mlp="moe", top_k=2, experts=4,
                     linears=(*moe.blocks[0].linears[:4],
                              LinearInfo("mlp.switch_mlp.up_proj", H, W, 4, False, 4 * (H + W),
                                         "mlp:64")))  # fmt: skip
    moe = replace(moe, blocks=(switch,))
    for change, name in (
        ({"fine_tune_type": "full"}, "full of a mixture of experts"),
        ({"fine_tune_type": "dora"}, "dora on switch linears"),
        ({"lora_dropout": 0.05}, "dropout on a mixture of experts"),
    ):
        with pytest.raises(EstimateRefused, match=name):
            adapter_terms(moe, replace(SHAPE, **change), 2)  # type: ignore[arg-type]
    # Keys that leave the experts out are modeled (mixtral with q/k/v/o adapters).
    adapter_terms(moe, replace(SHAPE, lora_keys=QKVO), 2)


TRAINABLE_SCRIPT = """
import json, sys
import mlx.core as mx, mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes
from mlx_lm.tuner.utils import linear_to_lora_layers
config, runs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
out = []
for run in runs:
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    model.freeze()
    if run["type"] == "full":
        for layer in model.layers[-run["layers"]:]:
            layer.unfreeze()
    else:
        params = {"rank": run["rank"], "scale": 20.0, "dropout": 0.0}
        if run["keys"] is not None:
            params["keys"] = run["keys"]
        linear_to_lora_layers(model, run["layers"], params, use_dora=run["type"] == "dora")
    out.append(sum(v.size for _, v in tree_flatten(model.trainable_parameters())))
print(json.dumps(out))
"""


def test_trained_elements_are_what_mlx_lm_trains() -> None:
    # mlx-lm's own modules (a child Python: this process never imports mlx), against the
    # estimator's count from a real census.
    config = {**ARCH, "hidden_size": 64, "intermediate_size": 96, "num_key_value_heads": 1}
    real = census_for(config, 16, 64, "float32", linears=True)
    assert real.has_linears
    paths = {lin.path for lin in real.blocks[0].linears}
    assert {*QKVO, "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"} <= paths
    runs = [
        {"type": "lora", "keys": None, "rank": 4, "layers": 2},
        {"type": "lora", "keys": ["self_attn.q_proj", "self_attn.v_proj"], "rank": 8, "layers": 3},
        {"type": "dora", "keys": list(QKVO), "rank": 4, "layers": 2},
        {"type": "full", "keys": None, "rank": 4, "layers": 2},
    ]
    child = subprocess.run(
        [sys.executable, "-c", TRAINABLE_SCRIPT, json.dumps(config), json.dumps(runs)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    counted = json.loads(child.stdout)
    for run, expected in zip(runs, counted, strict=True):
        shape = TrainingShape(
            lora_rank=run["rank"], lora_layers=run["layers"], fine_tune_type=run["type"],
            lora_keys=None if run["keys"] is None else tuple(run["keys"]), lora_dropout=0.1,
        )  # fmt: skip
        assert adapter_terms(real, shape, run["layers"]).elements == expected, run
