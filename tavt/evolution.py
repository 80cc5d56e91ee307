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
import logging
import os
import random

import numpy as np

_logger = logging.getLogger(__name__)

DUMMY_BATCH = 8  # the original profiled a (8, 3, img, img) tensor of ones and stored that batch's MACs


def approx_ratio(x, n=12, l=384):
    """LAT's mean relative length of the fixed-ratio chain. n=12 layers and l=384 (BERT's length, not ViT's 785)
    are hard-coded in the original; keeping them reproduces its 20 seed genes exactly."""
    s = 0
    i = l
    for _ in range(n):
        i = int(np.ceil(i * (1 - x)))
        s += i
    return s / (n * l)


def inverse(x):
    """The drop ratio whose approx_ratio is x (bisection to 1e-12)."""
    lo, hi = 0, 1
    while hi - lo > 1e-12:
        c = (lo + hi) / 2
        lo, hi = (c, hi) if x <= approx_ratio(c) else (lo, c)
    return lo


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

    # ---- files: one row per gene, tab-separated: gene tuple, MACs, score, method, parents
    def load_store(self, store_file):
        if not os.path.isfile(store_file):
            return
        with open(store_file) as f:
            for row in csv.reader(f, delimiter='\t'):
                gene, macs, score = (ast.literal_eval(x) for x in row[:3])
                self.store[tuple(gene)] = (macs, score, 0, None)
        _logger.info("loaded %d evaluated genes from %s", len(self.store), store_file)

    def save_store(self, store_file):
        with open(store_file, 'w', newline='') as f:
            writer = csv.writer(f, delimiter='\t')
            for gene in sorted(self.store, key=lambda g: self.store[g][0]):
                writer.writerow([str(gene)] + [str(x) for x in self.store[gene]])

    def save_population(self, population_file, population):
        with open(population_file, 'w', newline='') as f:
            writer = csv.writer(f, delimiter='\t')
            for gene in population:
                writer.writerow([str(gene)] + [str(x) for x in self.store[gene]])

    # ---- frontier and hull on the (MACs, score) plane
    def ccw(self, gene0, gene1, gene2):
        x0, y0 = self.store[gene0][:2]
        x1, y1 = self.store[gene1][:2]
        x2, y2 = self.store[gene2][:2]
        return (x0 * y1 + x1 * y2 + x2 * y0) - (x0 * y2 + x1 * y0 + x2 * y1)

    def convex_hull(self):
        """Upper hull of the frontier; only logged and saved (breeding draws from the whole frontier)."""
        hull = self.population[:2]
        for gene in self.population[2:]:
            if self.store[hull[-1]][1] >= self.store[gene][1]:
                continue
            while len(hull) >= 2 and self.ccw(hull[-2], hull[-1], gene) >= 0:
                del hull[-1]
            hull.append(gene)
        return hull

    def pareto_frontier(self):
        """Replace the population by its frontier: the cheapest gene, every gene more accurate than the last kept,
        and always the most expensive one. Returns (frontier, normalised area under it)."""
        self.population = sorted(self.population, key=lambda g: self.store[g][:2])
        frontier = [self.population[0]]
        for gene in self.population[1:-1]:
            if self.store[gene][1] > self.store[frontier[-1]][1]:
                # LAT compared the MACs with `frontier[-1][0]` (a length, a typo that never fires); the intended
                # check: a cheaper-or-equal gene at the same MACs is dominated by this more accurate one.
                if self.store[gene][0] == self.store[frontier[-1]][0]:
                    del frontier[-1]
                frontier.append(gene)
        if len(self.population) > 1:
            frontier.append(self.population[-1])
        self.population = frontier
        area = 0
        for gene0, gene1 in zip(self.population[:-1], self.population[1:]):
            x0, y0 = self.store[gene0][:2]
            x1, _ = self.store[gene1][:2]
            area += (x1 - x0) * y0
        span = (self.upper_constraint or 0) - self.lower_constraint
        return self.population, (area / span if span else 0.0)

    # ---- population growth
    def add_gene(self, gene, macs=None, score=None, method=0, parents=None):
        """Evaluate a new gene (unless cheaper than the lower bound) and add it to the population when its MACs lie
        within the bounds and it is not there yet. Returns whether it was added."""
        gene = tuple(int(g) for g in gene)
        if gene not in self.store:
            macs = macs or self.macs_fn(gene)
            if macs < self.lower_constraint:
                return False
            score = score if score is not None else float(self.evaluate_fn(gene))
            self.store[gene] = (macs, score, method, parents)
            _logger.info(store2str(gene, macs, score, method, parents))
        macs = self.store[gene][0]
        if macs >= self.lower_constraint and (self.upper_constraint is None or macs <= self.upper_constraint) \
                and gene not in self.population:
            self.population.append(gene)
            return True
        return False

    def mutate(self, mutation_prob):
        """Per layer, with probability `mutation_prob`, redraw the length uniformly between the parent's next
        length (2 after the last layer) and the child's previous one, which keeps the gene non-increasing."""
        gene = random.choice(self.population)
        child = ()
        for i in range(self.num_layers):
            if np.random.uniform() < mutation_prob:
                prev = self.max_seq_length if i == 0 else child[i - 1]
                nxt = 2 if i == self.num_layers - 1 else gene[i + 1]
                child += (random.randrange(nxt, prev + 1),)
            else:
                child += (gene[i],)
        return self.add_gene(child, method=1, parents=(gene,))

    def crossover(self):
        """Element-wise ceil of the mean of two distinct frontier genes."""
        gene0, gene1 = random.sample(self.population, 2)
        child = tuple((g0 + g1 + 1) // 2 for g0, g1 in zip(gene0, gene1))
        return self.add_gene(child, method=2, parents=(gene0, gene1))

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
