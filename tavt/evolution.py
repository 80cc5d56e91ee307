"""LAT's multi-objective evolutionary search over length configurations, as TAVT runs it.

The store maps a gene to (MACs, accuracy, method, parents), method 0 = seeded, 1 = mutation, 2 = crossover. Each
round keeps the Pareto frontier on (MACs, accuracy) as the population, logs its convex hull, writes three TSV files
and breeds `mutation_size` mutants and `crossover_size` crossovers from the frontier.

MACs are counted analytically with the project's convention (shared.flops) for the original's batch-of-8 dummy input
(the original profiled that batch with torchprofile, 78.510 G per ViT-B/16 image at 448 against 78.495 G here; the
values are only compared with each other and with the two bound genes, so the search itself is unchanged).
"""
import ast
import csv
import itertools
import logging
import os
import random

import numpy as np

_logger = logging.getLogger(__name__)

DUMMY_BATCH = 8  # the original profiled a (8, 3, img, img) tensor of ones and stored that batch's MACs


def approx_ratio(x, n=12, l=384):
    """LAT's mean relative length of the fixed-ratio chain. n=12 layers and l=384 (BERT's length, not ViT's 785)
    are hard-coded in the original; keeping them reproduces its 20 seed genes exactly."""
    chain = itertools.accumulate(range(n), lambda length, _: int(np.ceil(length * (1 - x))), initial=l)
    next(chain)  # the input length itself is not a layer's
    return sum(chain) / (n * l)


def inverse(x):
    """The drop ratio whose approx_ratio is x: bisection on [0, 1] (approx_ratio falls as the ratio grows) until
    the bracket is at most 1e-12 wide; returns its lower end."""
    low, high = 0, 1
    while high - low > 1e-12:
        mid = (low + high) / 2
        if x <= approx_ratio(mid):  # mid does not drop enough yet
            low = mid
        else:
            high = mid
    return low


def seed_ratios(length_drop_ratio_bound, population_size):
    """The constant drop ratios of the initial population: inverse of the interior points of
    linspace(approx_ratio(bound), 1, population_size + 2)."""
    points = np.linspace(approx_ratio(length_drop_ratio_bound), 1, population_size + 2)[1:-1]
    return [inverse(r) for r in points]


def store2str(gene, macs, score, method, parents=None):
    text = f"({', '.join(f'{x:3d}' for x in gene)}): {macs} MACs | score {score} | method {method}"
    if parents is not None:
        text += f"| parent(s) {parents}"
    return text


def _write_rows(path, store, genes):
    """One tab-separated row per gene: the gene tuple, then its MACs, score, method and parents, each as `str`."""
    with open(path, 'w', newline='') as f:
        csv.writer(f, delimiter='\t').writerows([str(gene), *map(str, store[gene])] for gene in genes)


def _turn(p, q, r):
    """Twice the signed area of the triangle p, q, r on the (MACs, score) plane: > 0 when r lies left of p -> q.
    The terms are summed in this fixed order so that a float result (and its sign at ~0) is reproducible."""
    (px, py), (qx, qy), (rx, ry) = p, q, r
    return (px * qy + qx * ry + rx * py) - (px * ry + qx * py + rx * qy)


def _strict_records(genes, score, floor):
    """The genes whose score beats `floor` and every score before them, in order."""
    records = []
    for gene in genes:
        if score(gene) > floor:
            records.append(gene)
            floor = score(gene)
    return records


class Evolution:
    """`macs_fn(gene) -> int` counts a gene's MACs; `evaluate_fn(gene) -> float` installs the gene and returns the
    test accuracy (a fraction)."""

    def __init__(self, macs_fn, evaluate_fn, num_layers, max_seq_length, lower_constraint=0, upper_constraint=None,
                 max_tries=1000, write=True):
        self.write = write  # only rank 0 writes the TSV files under torchrun
        self.macs_fn = macs_fn
        self.evaluate_fn = evaluate_fn
        self.num_layers = num_layers
        self.max_seq_length = max_seq_length
        self.lower_constraint = lower_constraint
        self.upper_constraint = upper_constraint
        self.max_tries = max_tries
        self.store = {}  # gene -> (macs, score, method, parents)
        self.population = []

    def _macs(self, gene):
        return self.store[gene][0]

    def _score(self, gene):
        return self.store[gene][1]

    def _point(self, gene):
        return self.store[gene][:2]

    # ---- files (see _write_rows for the row layout)
    def load_store(self, store_file):
        """Seed the store from a previous run's TSV (first three columns), so those genes are not re-evaluated;
        they count as seeded (method 0, no parents)."""
        if not os.path.isfile(store_file):
            return
        with open(store_file) as f:
            rows = list(csv.reader(f, delimiter='\t'))
        for text_gene, text_macs, text_score, *_ in rows:
            self.store[tuple(ast.literal_eval(text_gene))] = (ast.literal_eval(text_macs),
                                                               ast.literal_eval(text_score), 0, None)
        _logger.info("loaded %d evaluated genes from %s", len(self.store), store_file)

    def save_store(self, store_file):
        """Every evaluated gene, cheapest first (a stable sort: ties keep evaluation order)."""
        _write_rows(store_file, self.store, sorted(self.store, key=self._macs))

    def save_population(self, population_file, population):
        _write_rows(population_file, self.store, population)

    # ---- frontier and hull on the (MACs, score) plane
    def convex_hull(self):
        """Upper hull of the frontier; only logged and saved (breeding draws from the whole frontier).

        The first two genes are always taken; after them only genes that raise the score above every earlier one
        (from the second on) are candidates, and an upper monotone chain over those keeps the ones that bend
        downwards: a middle point left of or on the chord is removed."""
        head, tail = self.population[:2], self.population[2:]
        floor = self._score(head[-1]) if tail else None
        chain = []
        for gene in head + _strict_records(tail, self._score, floor):
            while len(chain) > 1 and _turn(self._point(chain[-2]), self._point(chain[-1]), self._point(gene)) >= 0:
                chain.pop()
            chain.append(gene)
        return chain

    def pareto_frontier(self):
        """Replace the population by its frontier and return (frontier, normalised area under it).

        Sorted by (MACs, score), every gene but the most expensive is grouped by MACs; a group's best gene (the
        first at its top score) joins when it beats every cheaper group's score (the cheapest group's always does).
        The most expensive gene always closes the frontier. The area is the staircase under it, divided by the
        MACs span between the two bound genes."""
        ranked = sorted(self.population, key=self._point)
        frontier, best = [], None
        for _, group in itertools.groupby(ranked[:-1], key=self._macs):
            champion = max(group, key=self._score)  # max keeps the first of equal scores
            if best is None or self._score(champion) > best:
                frontier.append(champion)
                best = self._score(champion)
        self.population = frontier + ranked[-1:]
        area = 0
        for left, right in zip(self.population, self.population[1:]):
            area += (self._macs(right) - self._macs(left)) * self._score(left)
        span = (self.upper_constraint or 0) - self.lower_constraint
        return self.population, (area / span if span else 0.0)

    # ---- population growth
    def _within_bounds(self, macs):
        return self.lower_constraint <= macs and (self.upper_constraint is None or macs <= self.upper_constraint)

    def add_gene(self, gene, macs=None, score=None, method=0, parents=None):
        """Evaluate a new gene (unless cheaper than the lower bound, then it is dropped unevaluated and unstored)
        and add it to the population when its MACs lie within the bounds and it is not there yet. Returns whether
        it was added."""
        gene = tuple(int(g) for g in gene)
        known = self.store.get(gene)
        if known is None:
            if not macs:
                macs = self.macs_fn(gene)
            if macs < self.lower_constraint:
                return False
            if score is None:
                score = float(self.evaluate_fn(gene))
            known = self.store[gene] = (macs, score, method, parents)
            _logger.info(store2str(gene, *known))
        if gene in self.population or not self._within_bounds(known[0]):
            return False
        self.population.append(gene)
        return True

    def mutate(self, mutation_prob):
        """A random frontier gene with each layer, with probability `mutation_prob`, redrawn uniformly between the
        parent's next length (2 after the last layer) and the child's previous one: the child stays
        non-increasing. Draws: one `random.choice`, one numpy uniform per layer, one `random.randint` per redrawn
        layer."""
        parent = random.choice(self.population)
        redraw = np.random.uniform(size=self.num_layers) < mutation_prob
        floors = parent[1:] + (2,)
        child = []
        for layer, (kept, floor) in enumerate(zip(parent, floors)):
            ceiling = child[-1] if child else self.max_seq_length
            child.append(random.randint(floor, ceiling) if redraw[layer] else kept)
        return self.add_gene(child, method=1, parents=(parent,))

    def crossover(self):
        """Element-wise mean of two distinct frontier genes, rounded up."""
        pair = tuple(random.sample(self.population, 2))
        child = [-(-(a + b) // 2) for a, b in zip(*pair)]
        return self.add_gene(child, method=2, parents=pair)

    def grow(self, operator, count, *op_args):
        """Call `operator` until it succeeds `count` times. The original retried forever (a frontier of one gene
        cannot even cross over); here at most `max_tries` attempts, then a warning."""
        added = tries = 0
        while added < count:
            if tries >= self.max_tries:
                _logger.warning("%s: only %d of %d new genes after %d attempts; going on", operator.__name__,
                                added, count, tries)
                break
            tries += 1
            if operator == self.crossover and len(self.population) < 2:
                continue
            if operator(*op_args):
                added += 1
        return added

    def run(self, lower_gene, upper_gene, seed_genes, evo_iter, mutation_prob, mutation_size, crossover_size,
            out_dir):
        """The original's search loop; writes store-/population-/parents-iter{i}.tsv under out_dir."""
        self.add_gene(lower_gene, method=0)
        self.add_gene(upper_gene, method=0)
        self.lower_constraint = self.store[lower_gene][0]
        self.upper_constraint = self.store[upper_gene][0]
        for gene in seed_genes:
            self.add_gene(gene, method=0)
        for i in range(evo_iter + 1):
            _logger.info(f"| Start Iteration {i}:")
            population, area = self.pareto_frontier()
            parents = self.convex_hull()
            results = {"area": area, "population_size": len(population), "num_parents": len(parents)}
            _logger.info(f"| >>>>>>>> {' | '.join(f'{k} {v}' for k, v in results.items())}")
            for gene in parents:
                _logger.info("| " + store2str(gene, *self.store[gene][:3]))
            if self.write:
                self.save_store(os.path.join(out_dir, f'store-iter{i}.tsv'))
                self.save_population(os.path.join(out_dir, f'population-iter{i}.tsv'), population)
                self.save_population(os.path.join(out_dir, f'parents-iter{i}.tsv'), parents)
            if i == evo_iter:
                break
            self.grow(self.mutate, mutation_size, mutation_prob)
            self.grow(self.crossover, crossover_size)
        return self.population


def read_population(path):
    """The genes and their (MACs, score) from a population/store TSV."""
    rows = []
    with open(path) as f:
        for row in csv.reader(f, delimiter='\t'):
            rows.append((tuple(ast.literal_eval(row[0])), ast.literal_eval(row[1]), ast.literal_eval(row[2])))
    return rows
