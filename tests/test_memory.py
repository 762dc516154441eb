"""The C heap after loading: freed tensors' memory is kept and reused (bloom.memory.keep_freed_memory), counted by
heap_free_bytes (which available_memory adds), and left alone when the user has set malloc's thresholds. Each check
runs in a fresh process, whose allocator has not been set yet, and counts the kernel's page faults (getrusage), not
time."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest
from tiny_checkpoint import random_hf_bloom, save_transformers

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's malloc's")

MEASURE = """
import resource, sys, torch
from bloom import load_pretrained
from bloom.memory import heap_free_bytes

BLOCK = 64 * 2**20  # bytes: far above glibc's default threshold for mapping a block afresh (128 kB-32 MB)

def faults_of_refilling() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        torch.empty(BLOCK // 4).fill_(1.0)  # allocated, touched, freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print(faults_of_refilling())
load_pretrained(sys.argv[1])
faults_of_refilling()  # the heap grows once
print(faults_of_refilling())
torch.empty(BLOCK // 4).fill_(1.0)
print(heap_free_bytes())
"""


def measure(folder, env=None) -> list[int]:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(MEASURE), str(folder)], capture_output=True,
                            text=True, env=env, check=True)  # fmt: skip
    return [int(line) for line in result.stdout.split()]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_transformers(random_hf_bloom(), tmp_path_factory.mktemp("tiny"))


def test_after_loading_freed_tensors_are_reused_not_paged_in_again(checkpoint):
    page = os.sysconf("SC_PAGE_SIZE")
    pages = 64 * 2**20 // page
    before, after, free = measure(checkpoint)
    assert before >= 4 * pages * 0.9  # every refill faulted its pages in afresh
    assert after < pages * 0.1  # the block the heap kept, reused
    assert free >= 64 * 2**20  # the freed block, held for reuse, counted by heap_free_bytes


def test_the_users_own_malloc_setting_is_left_alone(checkpoint):
    _, after, _ = measure(checkpoint, env=os.environ | {"MALLOC_TRIM_THRESHOLD_": str(128 * 1024)})
    page = os.sysconf("SC_PAGE_SIZE")
    assert after >= 4 * (64 * 2**20 // page) * 0.9  # still paged in at every refill, as the user asked
