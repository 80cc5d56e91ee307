"""TAVT's search bookkeeping, length samplers and LR schedule against recorded outputs and brute-force definitions.

The recorded values (search trace, TSV hashes, sampled genes, learning rates) were produced by the implementation
that reproduced the original TAVT code, with the seeds used here; the rewrite must give them bit for bit."""
import hashlib
import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch

from tavt.evolution import Evolution, seed_ratios
from tavt.length_drop import sample_layer_configuration, sample_length_configuration
from tavt.scheduler import build_scheduler


# ---------------------------------------------------------------------------------------------------------------
# the search: a cheap deterministic evaluator, 4 layers of at most 9 tokens

def _fake_search(tmp_path):
    evaluated = []

    def evaluate(gene):
        evaluated.append(gene)
        return (sum(x * (i + 1) for i, x in enumerate(gene)) * 37 % 101) / 100

    random.seed(0)
    np.random.seed(0)
    evolution = Evolution(lambda gene: sum(x * x for x in gene), evaluate, num_layers=4, max_seq_length=9)
    lower = sample_length_configuration(9, 4, length_drop_ratio=0.3)
    seeds = [sample_length_configuration(9, 4, length_drop_ratio=r) for r in seed_ratios(0.3, 4)]
    population = evolution.run(lower, (9,) * 4, seeds, evo_iter=3, mutation_prob=0.5, mutation_size=3,
                               crossover_size=3, out_dir=str(tmp_path))
    return evolution, evaluated, population


RECORDED_EVALUATIONS = [
    (7, 5, 4, 3), (9, 9, 9, 9), (8, 7, 6, 5), (7, 7, 6, 5), (9, 9, 9, 7), (9, 9, 7, 7), (9, 8, 8, 7), (9, 9, 9, 8),
    (9, 8, 7, 6), (7, 6, 6, 3), (9, 7, 7, 5), (9, 9, 6, 6), (8, 6, 5, 4), (8, 7, 7, 2), (8, 8, 2, 2), (8, 8, 8, 2),
    (8, 7, 7, 4), (8, 8, 5, 2), (8, 7, 4, 3)]
RECORDED_FILE_HASHES = {  # sha256 prefixes of the TSV files
    'parents-iter0.tsv': '3af0481b82ae8567', 'parents-iter1.tsv': '3af0481b82ae8567',
    'parents-iter2.tsv': 'e15c86f140a8d1ec', 'parents-iter3.tsv': 'e15c86f140a8d1ec',
    'population-iter0.tsv': 'f5a21df9c49a208a', 'population-iter1.tsv': '4f097408ac97b5e4',
    'population-iter2.tsv': 'f987facf179eef02', 'population-iter3.tsv': 'f987facf179eef02',
    'store-iter0.tsv': 'f5a21df9c49a208a', 'store-iter1.tsv': '5e0f4fb0d976744b',
    'store-iter2.tsv': 'b4c354c53b58be1e', 'store-iter3.tsv': 'c92a340f4d00db8a'}


def test_search_trace_and_files_match_recording(tmp_path):
    _, evaluated, population = _fake_search(tmp_path)
    assert evaluated == RECORDED_EVALUATIONS
    assert population == [(7, 5, 4, 3), (7, 6, 6, 3), (8, 7, 6, 5), (9, 9, 9, 9)]
    hashes = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in sorted(tmp_path.iterdir())}
    assert hashes == RECORDED_FILE_HASHES
    assert (tmp_path / 'population-iter3.tsv').read_bytes() == (
        b'(7, 5, 4, 3)\t99\t0.02\t0\tNone\r\n(7, 6, 6, 3)\t130\t0.96\t1\t((7, 5, 4, 3),)\r\n'
        b'(8, 7, 6, 5)\t174\t0.99\t0\tNone\r\n(9, 9, 9, 9)\t324\t0.98\t0\tNone\r\n')


def test_children_follow_the_breeding_rules(tmp_path):
    evolution, _, _ = _fake_search(tmp_path)
    methods = {1: 0, 2: 0}
    for gene, (_, _, method, parents) in evolution.store.items():
        assert all(a >= b for a, b in zip(gene, gene[1:])) and 2 <= gene[-1] and gene[0] <= 9
        if method == 2:  # crossover: element-wise mean rounded up
            assert gene == tuple(math.ceil((a + b) / 2) for a, b in zip(*parents))
        elif method == 1:  # mutation: a changed layer lies between the parent's next length and the child's previous
            (parent,) = parents
            for i, (g, p) in enumerate(zip(gene, parent)):
                if g != p:
                    assert (parent[i + 1] if i < 3 else 2) <= g <= (gene[i - 1] if i else 9)
        if method in methods:
            methods[method] += 1
    assert methods[1] > 0 and methods[2] > 0


def test_store_round_trips_through_load_store(tmp_path):
    evolution, _, _ = _fake_search(tmp_path)
    reloaded = Evolution(None, None, 4, 9)
    reloaded.load_store(str(tmp_path / 'store-iter3.tsv'))
    assert {g: v[:2] for g, v in reloaded.store.items()} == {g: v[:2] for g, v in evolution.store.items()}
    assert all(v[2:] == (0, None) for v in reloaded.store.values())


# ---------------------------------------------------------------------------------------------------------------
# frontier and hull against brute-force definitions

def _random_evolution(rng, n, distinct_macs=False):
    evolution = Evolution(None, None, 2, 10, lower_constraint=0, upper_constraint=rng.choice([None, 40]))
    macs = rng.sample(range(40), n) if distinct_macs else [rng.randrange(12) for _ in range(n)]
    for k in range(n):
        evolution.store[(k, 0)] = (macs[k], rng.randrange(9) / 8, 0, None)  # eighths: exact float arithmetic
    evolution.population = list(evolution.store)
    rng.shuffle(evolution.population)
    return evolution


def _frontier_by_dominance(evolution):
    """Sorted by (MACs, score), the most expensive gene, plus every other gene that no cheaper one (of those) matches
    in score and that is the first of the best score at its own MACs."""
    store = evolution.store
    ranked = sorted(evolution.population, key=lambda g: store[g][:2])
    body = ranked[:-1]

    def kept(i, gene):
        macs, score = store[gene][:2]
        for j, other in enumerate(body):
            other_macs, other_score = store[other][:2]
            if other_macs < macs and other_score >= score:
                return False
            if other_macs == macs and (other_score > score or (other_score == score and j < i)):
                return False
        return True

    return [g for i, g in enumerate(body) if kept(i, g)] + ranked[-1:]


def _hull_by_chords(evolution):
    """The first two frontier genes and each later one that raises the score above all before it (from the second
    on); of those, the first, the last, and every one strictly above each chord from an earlier to a later one."""
    store = evolution.store
    candidates = list(evolution.population[:2])
    for gene in evolution.population[2:]:
        if store[gene][1] > store[candidates[-1]][1]:
            candidates.append(gene)

    def above(a, q, c):  # q strictly above the line a -> c (x increasing), in exact arithmetic
        (ax, ay), (qx, qy), (cx, cy) = (tuple(map(Fraction, store[g][:2])) for g in (a, q, c))
        return (cx - ax) * (qy - ay) - (qx - ax) * (cy - ay) > 0

    return [q for k, q in enumerate(candidates)
            if k in (0, len(candidates) - 1)
            or all(above(a, q, c) for a in candidates[:k] for c in candidates[k + 1:])]


@pytest.mark.parametrize('distinct_macs', [False, True])
def test_frontier_and_area_against_definitions(distinct_macs):
    rng = random.Random(1)
    for _ in range(300):
        evolution = _random_evolution(rng, rng.randrange(1, 25), distinct_macs)
        expected = _frontier_by_dominance(evolution)
        frontier, area = evolution.pareto_frontier()
        assert frontier == expected == evolution.population
        steps = sum((Fraction(evolution.store[b][0]) - evolution.store[a][0]) * Fraction(evolution.store[a][1])
                    for a, b in zip(frontier, frontier[1:]))
        assert area == (float(steps / 40) if evolution.upper_constraint else 0.0)


def test_hull_against_chord_definition():
    rng = random.Random(2)
    sizes = []
    for _ in range(300):
        evolution = _random_evolution(rng, rng.randrange(1, 25), distinct_macs=True)
        evolution.pareto_frontier()
        hull = evolution.convex_hull()
        assert hull == _hull_by_chords(evolution)
        sizes.append(len(evolution.population) - len(hull))
    assert max(sizes) >= 2  # the sets do exercise dropping points


# ---------------------------------------------------------------------------------------------------------------
# length samplers

def test_samplers_match_recording():
    np.random.seed(0)
    assert [sample_length_configuration(50, 6, length_drop_prob=0.2),
            sample_length_configuration(50, 6, length_drop_ratio_bound=0.4),
            sample_length_configuration(50, 6, (1, 2, 4), length_drop_ratio_bound=0.4),
            sample_layer_configuration(6, layer_dropout_prob=0.3)] == [
        (40, 31, 24, 19, 16, 12), (34, 28, 23, 22, 22, 15), (50, 36, 29, 29, 25, 25), (0, 1, 2, 3, 4, 5)]


@pytest.mark.parametrize('seed', range(5))
def test_samplers_against_explicit_draws(seed):
    """Replay the draws on a RandomState of the same seed: binomial drops per layer, or a uniform integer between
    ceil((1 - bound) * n) and n; layers outside the layer configuration keep n; never below min_length."""
    np.random.seed(seed)
    got = [sample_length_configuration(30, 8, length_drop_prob=0.3, min_length=3),
           sample_length_configuration(30, 8, (0, 3, 4, 7), length_drop_ratio_bound=0.5)]
    rs = np.random.RandomState(seed)
    n, by_prob = 30, []
    for _ in range(8):
        n = max(3, n - int(rs.binomial(n, 0.3)))
        by_prob.append(n)
    n, by_bound = 30, []
    for layer in range(8):
        if layer in (0, 3, 4, 7):
            n = max(2, int(rs.randint(math.ceil(n * 0.5), n + 1)))
        by_bound.append(n)
    assert got == [tuple(by_prob), tuple(by_bound)]
    assert all(type(x) is int for gene in got for x in gene)
    assert sample_length_configuration(30, 4, length_drop_ratio=0.25) == (23, 18, 14, 11)


# ---------------------------------------------------------------------------------------------------------------
# learning-rate schedule

RECORDED_LRS = {
    'cosine': [0.0, 0.03333333333333333, 0.06666666666666667, 0.1, 0.09504844339512096, 0.08117449009293669,
               0.06112604669781572, 0.03887395330218429, 0.018825509907063328, 0.004951556604879049, 0.0],
    'linear': [0.0, 0.03333333333333333, 0.06666666666666667, 0.1, 0.08571428571428572, 0.07142857142857144,
               0.05714285714285714, 0.04285714285714286, 0.02857142857142857, 0.014285714285714285, 0.0],
}


def _lrs(decay_type, warmup, total, base_lr=0.1):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = build_scheduler(optimizer, decay_type, warmup, total)
    lrs = [optimizer.param_groups[0]['lr']]
    for _ in range(total):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]['lr'])
    return lrs


@pytest.mark.parametrize('decay_type', ['cosine', 'linear'])
def test_schedule_matches_recording(decay_type):
    assert _lrs(decay_type, 3, 10) == RECORDED_LRS[decay_type]


@pytest.mark.parametrize('decay_type', ['cosine', 'linear'])
def test_schedule_against_closed_form(decay_type):
    warmup, total = 50, 400
    lrs = _lrs(decay_type, warmup, total, base_lr=3e-2)
    for step, lr in enumerate(lrs):
        if step < warmup:
            expected = step / warmup
        elif decay_type == 'cosine':
            expected = (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2
        else:
            expected = (total - step) / (total - warmup)
        assert lr == pytest.approx(3e-2 * expected, rel=1e-12, abs=1e-18)
    assert lrs[warmup] == 3e-2 and lrs[-1] == pytest.approx(0, abs=1e-18)
