"""On a CUDA device: the same logits as on the CPU, and the CUDA-graph decode step gives the eager tokens.

These run only where a GPU is (CI has none); `scripts/gpu_check.sh` runs them with the GPU benchmarks.
"""

import pytest
import torch
from tiny_checkpoint import left_padded, random_hf_bloom, save_transformers

from bloom import generate, load_pretrained
from bloom.generation.decoder import Decoder
from bloom.scale.quantize import Int8Linear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_transformers(random_hf_bloom(hidden_size=128, n_head=4, n_layer=3), tmp_path_factory.mktemp("cuda"))


def test_cuda_logits_equal_the_cpu_logits(folder):
    ids, mask = left_padded([9, 4, 6])
    with torch.no_grad():
        cpu = load_pretrained(folder, dtype="fp32")(ids, mask)
        cuda = load_pretrained(folder, dtype="fp32", device="cuda")(ids.cuda(), mask.cuda()).cpu()
    real = mask.bool()
    torch.testing.assert_close(cuda[real], cpu[real], rtol=0, atol=1e-4)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_cuda_graph_decoder_gives_the_eager_tokens(folder, quantize):
    from torch._dynamo.utils import counters

    model = load_pretrained(folder, dtype="fp32", device="cuda", quantize=quantize)
    assert isinstance(model.h[0].mlp.dense_h_to_4h, Int8Linear) == (quantize == "int8")
    decoders = [Decoder(model, 3, 48, compile=True), Decoder(model, 3, 48, compile=True)]
    counters.clear()
    # the second call replays the recorded graph; the other decoder's cache is at other addresses (a re-record)
    for decoder, (lengths, new) in zip(decoders * 2, [([9, 4, 6], 20), ([12, 12, 2], 30)] * 2, strict=True):
        ids, mask = (t.cuda() for t in left_padded(lengths))
        eager = generate(model, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[])
        graphed = generate(model, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[], decoder=decoder)
        assert torch.equal(graphed, eager)
    assert not counters["inductor"]["cudagraph_skips"]  # the step really ran as a CUDA graph
