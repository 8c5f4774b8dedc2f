"""Program-to-tile schedule of the head kernels, written once for both worlds.

The functions here use only `+ - * // %` and comparisons, so the same source runs on Python ints (the launcher,
the tests and the static L2 model of `sprm_kernels.aot` call them directly) and inside Triton kernels
(`head.program_tile` and `head.split_columns` are `triton.jit` of these very functions). The model therefore
replays exactly the order in which the kernels visit tiles.

Shapes: S gathered rows in `num_row_blocks` blocks of BLOCK_S; the F = 2H columns of W1 in `num_splits` column
splits. A 1-D grid of num_row_blocks * num_splits programs.
"""

from __future__ import annotations

try:  # the interpreter runs a jit function only if triton.language is among its globals; the ints need nothing
    import triton.language as tl  # noqa: F401
except ImportError:  # pragma: no cover
    pass


def program_tile(pid, num_row_blocks, num_splits, group_splits):
    """(row block, column split) of program `pid`, in grouped order.

    Programs come in groups of `group_splits` column splits x all row blocks; inside a group the split varies
    fastest. A group's W1 columns (group_splits x BLOCK_N rows of W1) stay in L2 while every row block streams
    past them, and the programs that run together share their row block of X: X is read from DRAM once per
    group, W1 once in all. The last group may hold fewer splits. group_splits >= num_splits is row-major order
    (all splits of row block 0, then row block 1, ...), the decode schedule.
    """
    per_group = group_splits * num_row_blocks
    group = pid // per_group
    first_split = group * group_splits
    splits_here = num_splits - first_split
    splits_here = splits_here + (group_splits - splits_here) * (splits_here > group_splits)  # min(left, group)
    local = pid - group * per_group
    return local // splits_here, first_split + local % splits_here


def split_columns(split, num_splits, num_granules, granule):
    """[begin, end) columns of W1 (rows of the [F, H] matrix) owned by column split `split`.

    The F columns are `num_granules` granules of `granule` columns (the last one may be short: the kernel masks
    columns >= F); split n owns granules [n * G // num_splits, (n + 1) * G // num_splits), so the splits differ
    by at most one granule however num_splits relates to F. num_granules = 0 gives every split an empty range.
    """
    begin = (split * num_granules // num_splits) * granule
    end = ((split + 1) * num_granules // num_splits) * granule
    return begin, end
