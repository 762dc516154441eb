"""The C heap (bloom.heap): after loading, a tensor's freed memory is kept and reused instead of being paged in
afresh, a forward pass hands it back to the OS when it ends, and a user's own malloc thresholds are left alone.
Each check runs in a fresh process, whose allocator has not been set yet, and counts the kernel's page faults
(getrusage) and resident pages (/proc/self/statm), not time."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest
from tiny_checkpoint import random_hf_bloom, save_transformers

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's malloc's")

BLOCK = 64 * 2**20  # bytes: far above glibc's default threshold for mapping a block afresh (128 kB-32 MB)
PAGES = BLOCK // os.sysconf("SC_PAGE_SIZE")

MEASURE = f"""
import resource, sys, torch
from bloom import load_pretrained

def faults_of_refilling():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        torch.empty({BLOCK} // 4).fill_(1.0)  # allocated, touched, freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def resident_pages():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1])

print(faults_of_refilling())
model = load_pretrained(sys.argv[1])
faults_of_refilling()  # the heap grows once
print(faults_of_refilling())
kept = resident_pages()
with torch.no_grad():
    model(torch.tensor([[5, 6, 7]]))  # a pass over 3 tokens
print(kept - resident_pages())
"""


def measure(folder, env=None) -> list[int]:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(MEASURE), str(folder)], capture_output=True,
                            text=True, env=env, check=True)  # fmt: skip
    return [int(line) for line in result.stdout.split()]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_transformers(random_hf_bloom(), tmp_path_factory.mktemp("tiny"))


def test_after_loading_freed_tensors_are_reused_and_a_forward_hands_them_back(checkpoint):
    before, after, released = measure(checkpoint)
    assert before >= 4 * PAGES * 0.9  # every refill faulted its pages in afresh
    assert after < PAGES * 0.1  # the block the heap kept, reused
    assert released >= PAGES * 0.75  # the kept block handed back when the pass ended (less the logits it made)


def test_the_users_own_malloc_setting_is_left_alone(checkpoint):
    _, after, _ = measure(checkpoint, env=os.environ | {"MALLOC_TRIM_THRESHOLD_": str(128 * 1024)})
    assert after >= 4 * PAGES * 0.9  # still paged in at every refill, as the user asked


GENERATION = """
import os, torch
from bloom import Bloom, BloomConfig, generate

def resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20

torch.manual_seed(0)
model = Bloom(BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=250880)).eval()  # logits: 8 MB a step
seen = []  # the resident memory after each step
generate(model, torch.randint(4, 250000, (8, 20)), max_new_tokens=300, eos_token_id=[],
         streamer=lambda tokens: seen.append(resident_mb()))
print(seen[49], seen[-1])
"""


def test_a_long_generation_does_not_grow_step_by_step():
    """Tensors kept per step among the steps' freed logits used to keep the C heap from reusing them: a batch of 8
    grew by ~6 MB a step until the generation ended."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(GENERATION)], capture_output=True, text=True,
                            check=True)  # fmt: skip
    after_50, after_300 = map(int, result.stdout.split())
    assert after_300 - after_50 < 150  # MB over 250 steps of 8 MB of logits each
