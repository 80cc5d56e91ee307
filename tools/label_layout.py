"""Placing point labels on a scatter plot so that no two labels overlap (tools/compare.py's plots).

Pure geometry in display units (pixels, y upwards, matplotlib's convention): each label is a box of known size
attached to a point. Labels are placed one after the other, each at the first candidate position around its point
that stays inside the plotting area and clears every label already placed and every marker. Candidates come in
rings of growing distance, so a label sits next to its point when there is room and further out, on a leader line,
when points crowd. A label that finds no free place at all takes the candidate it overlaps least.
"""
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Box:
    x0: float
    y0: float
    x1: float
    y1: float

    def overlap(self, other):
        """Area shared with `other` (0 when they only touch or are apart)."""
        w = min(self.x1, other.x1) - max(self.x0, other.x0)
        h = min(self.y1, other.y1) - max(self.y0, other.y0)
        return w * h if w > 0 and h > 0 else 0.0

    def inside(self, other):
        return self.x0 >= other.x0 and self.y0 >= other.y0 and self.x1 <= other.x1 and self.y1 <= other.y1

    def grown(self, pad):
        return Box(self.x0 - pad, self.y0 - pad, self.x1 + pad, self.y1 + pad)


# directions tried on every ring, the nearest-looking first: right, left, above, below, then the diagonals
_DIRECTIONS = (0, 180, 90, 270, 45, 135, 315, 225, 22.5, 157.5, 337.5, 202.5, 67.5, 112.5, 292.5, 247.5)


def _candidate(point, size, angle, distance):
    """The box of a label of `size` whose side or corner facing `point` lies `distance` away in direction `angle`."""
    (px, py), (w, h) = point, size
    dx, dy = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    # the label's centre: far enough along the direction that the whole box clears the point by `distance`
    cx = px + dx * (distance + w / 2)
    cy = py + dy * (distance + h / 2)
    return Box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def place_labels(points, sizes, area, marker_radius=5.0, gap=2.0, step=None, rings=12):
    """Boxes for labels of `sizes` ((width, height) each) attached to `points` ((x, y) each), inside `area` (a Box).

    Returns one Box per label, in the order given. Labels never cover a marker (a square of `marker_radius` around
    every point) nor each other (kept `gap` apart) unless there is no free candidate within `rings` rings."""
    if step is None:  # one ring further per label height
        step = max((h for _, h in sizes), default=1.0)
    markers = [Box(x - marker_radius, y - marker_radius, x + marker_radius, y + marker_radius) for x, y in points]
    placed = []
    for point, size in zip(points, sizes):
        best, best_cost = None, None
        for ring in range(rings):
            distance = marker_radius + gap + ring * step
            for angle in _DIRECTIONS:
                box = _candidate(point, size, angle, distance)
                padded = box.grown(gap)
                cost = sum(padded.overlap(b) for b in placed) + sum(box.overlap(m) for m in markers)
                if not box.inside(area):
                    cost += size[0] * size[1]  # outside the plot: worse than any overlap of one label
                if cost == 0:
                    best, best_cost = box, 0
                    break
                if best_cost is None or cost < best_cost:
                    best, best_cost = box, cost
            if best_cost == 0:
                break
        placed.append(best)
    return placed


def _distance(point, box):
    px, py = point
    return math.hypot(max(box.x0 - px, 0.0, px - box.x1), max(box.y0 - py, 0.0, py - box.y1))


def needs_leader(point, box, marker_radius=5.0, gap=2.0, others=()):
    """True when a line should show which point the label names: it sits away from its point, or another point
    (of `others`) is at least as close to it as its own."""
    own = _distance(point, box)
    return own > marker_radius + 2 * gap + 1.0 or any(_distance(o, box) <= own for o in others if o != point)


def any_overlap(boxes):
    """Pairs (i, j) of boxes that overlap (for checks)."""
    return [(i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes)) if boxes[i].overlap(boxes[j]) > 0]
