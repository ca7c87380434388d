"""The forward for Hopper (sm_90) in Gluon, for the unmasked and causal cases.

Triton's compiler, given the forward of _forward.py, issues Q K^T, waits for it, runs the softmax
with the tensor cores idle, then issues P V; its automatic warp specialisation, which would
overlap them, builds wrong code for attention on sm_90 (benchmarks/ws_repro.py). Gluon, Triton's
lower-level language, lets the schedule be written out. This is FlashAttention-3's:

- a producer warp loads K and V tiles by TMA into a ring of three buffers;
- two consumer warp groups each own half of the block's 128 query rows; per key tile a group
  issues S[j] = Q K[j]^T and O += P[j-1] V[j-1] together, waits for S[j] only, and runs the
  softmax of S[j] while P[j-1] V[j-1] is still on the tensor cores;
- the groups take turns at issuing (ping-pong, a pair of mbarriers), so one group's softmax runs
  while the other group's products hold the tensor cores;
- the grid is persistent: one program per SM takes its work items (query blocks) in turn, so the
  next item's K/V tiles and queries load while an item ends; causal blocks go in pairs of equal
  work (block j with block n - 1 - j), so that programs taking them in turn finish together.

On an H200 (bf16, B4 H32 N4096 D128) it runs the forward at 616 TFLOP/s against 474 for
_forward.py (docs/perf-notes.md, "v10"). It serves what it is built for (attention_forward
checks `eligible` first): fp16/bf16, head dim 64 or 128, no mask, no key padding, no dropout, no
packed sequences, causal only where every query row sees a key, and sequences long enough for it
to be the faster (MIN_LENGTH); everything else goes to _forward.py. It writes the same outputs
(O, and the lse with its two terms), so the backward is shared. Gluon has no interpreter: the CPU
tests compile it for sm_90, the GPU tests run it.
"""

import os

import torch

from . import _common
from ._hopper import AVAILABLE, ONCE, config_from_env, plain_call, sm_count, tma_ok

if AVAILABLE:
    from ._hopper import (fence_async_shared, gl, gluon, mbarrier, tma, tma_load, tma_store,
                          warpgroup_mma, warpgroup_mma_wait)

# HF_FLASH_HOPPER_FWD=0 sends every forward to _forward.py (for comparisons and bisection).
ENABLED = os.environ.get("HF_FLASH_HOPPER_FWD", "1") != "0"

BLOCK_M = 128  # query rows per program: two consumer groups of 64
GROUP_M = BLOCK_M // 2
# BLOCK_N: keys per tile. NUM_BUF: K/V buffers (tile j in use, j + 1 loaded, j + 2 loading).
# WORKER_REGS: registers per thread for the worker partitions (consumer group 1, producer), set by
# setmaxnreg; the default partition (group 0) takes what is left. Without it all 12 warps get 168
# and the 64 x 128 score and accumulator tiles spill. maxnreg: the launch's registers per thread
# (None: the compiler's choice, 168), which decides how many programs share an SM.
# PERSISTENT: one program per SM, each taking work items (query blocks) in turn, so that an
# item's start (its Q and first K/V tiles) loads while the last one ends; else one program per item.
# PAIRED: causal calls take query blocks in pairs (_item). CARRY: an item's last P V and epilogue
# overlap the next item's first tile (_consumer; not where O is staged in Q's buffer).
# LEAN_TILE0: an item's first key tile is masked only where it needs to be; head dim 64 only, where
# a tile waits on its softmax (at 128 on its products, and causal 128 would spill with it): 2-3 %
# off the head-dim-64 forwards on an H100 (docs/perf-notes.md, "v13").
CONFIG = {"BLOCK_N": 128, "NUM_BUF": 3, "WORKER_REGS": (240, 24), "maxnreg": None,
          "PERSISTENT": True, "PAIRED": True, "CARRY": False, "LEAN_TILE0": True}
# HF_FLASH_HOPPER_CONFIG='{"BLOCK_N": 64, ...}' replaces entries (experiments: the GPU tests run
# under it, so a config is checked before it is timed or kept).
CONFIG = config_from_env(CONFIG, "HF_FLASH_HOPPER_CONFIG")

# Q plus O staging plus the K/V ring above this many bytes: O is staged in Q's buffer instead.
SMEM_FOR_SEPARATE_O = 200 * 1024

# The shortest sequence (queries and keys) this kernel takes, per (head dim, causal): below it
# _forward.py is faster. Measured on an H100 (Triton 3.6), bf16 forwards, ms, median of 5
# interleaved rounds, this kernel / _forward.py (benchmarks/results/h100/experiments/
# hopper_fwd_configs_rounds_ca2856f.*), and the bench_ops sweep of 16k-token batches
# (ops_sweep_*_fwd_persist_{on,off}_*_64d63b3.*). At head dim 64 an item's tiles wait on their
# softmax, and at short causal lengths the start and end of each item are not hidden.
#   D64:  B32 H16 n=512 0.103 / 0.113, B8 H16 n=2048 0.327 / 0.347; causal: B16 H16 n=1024
#         0.137 / 0.127, B8 H16 n=2048 0.198 / 0.210
#   D128: B32 H16 n=512 0.164 / 0.210; causal: sweep n=512 0.156 / 0.149, B16 H16 n=1024
#         0.188 / 0.219
MIN_LENGTH = {(64, False): 512, (64, True): 2048, (128, False): 512, (128, True): 1024}


if AVAILABLE:
    @gluon.jit
    def _n_mine(n_m, BH, PAIRED: gl.constexpr):
        """How many work items (blocks of BLOCK_M query rows of one head) this program takes."""
        per_unit: gl.constexpr = 2 if PAIRED else 1
        units = n_m // per_unit * BH
        return per_unit * ((units - gl.program_id(0) + gl.num_programs(0) - 1)
                           // gl.num_programs(0))

    @gluon.jit
    def _item(k, n_m, BH, PAIRED: gl.constexpr, IS_CAUSAL: gl.constexpr):
        """This program's k-th work item: (bh, query block). Programs take units in turn, so
        every program must get about the same work, and the programs running at once should
        share K and V in L2."""
        pid = gl.program_id(0)
        programs = gl.num_programs(0)
        if PAIRED:
            # Causal, n_m even: a unit is query blocks j and n_m - 1 - j of one head, the long
            # one first, n_m + 1 key tiles together whatever j is; units in head order.
            half = n_m // 2
            unit = pid + (k // 2) * programs
            j = unit % half
            second = k % 2
            return unit // half, (n_m - 1 - j) * (1 - second) + j * second
        item = pid + k * programs
        if IS_CAUSAL:
            # Longest first (later query blocks see more keys), every head's at once.
            return item % BH, n_m - 1 - item // BH
        # A head's blocks together: the programs running at once share its K and V in L2.
        return item // n_m, item % n_m

    @gluon.jit
    def _producer(k_desc, v_desc, k_smem, v_smem, ready, free, H, GROUP, BH, n_m,
                  N_K, causal_offset, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  D: gl.constexpr, IS_CAUSAL: gl.constexpr, NUM_BUF: gl.constexpr,
                  PAIRED: gl.constexpr):
        kv_bytes: gl.constexpr = 2 * BLOCK_N * D * k_desc.dtype.primitive_bitwidth // 8
        g = 0  # tiles loaded by this program so far, over all its items: the ring's position
        for k in range(0, _n_mine(n_m, BH, PAIRED)):
            bh, pid_m = _item(k, n_m, BH, PAIRED, IS_CAUSAL)
            off_b = bh // H
            off_hk = (bh % H) // GROUP  # grouped-query attention: GROUP query heads share K/V
            n_tiles = _n_tiles(pid_m * BLOCK_M, N_K, causal_offset, BLOCK_M, BLOCK_N, IS_CAUSAL)
            for t in range(0, n_tiles):
                buf = g % NUM_BUF
                # Once the ring has gone round, both groups must have released the buffer's tile.
                mbarrier.wait(free.index(buf), phase=((g // NUM_BUF) + 1) & 1, pred=g >= NUM_BUF)
                mbarrier.expect(ready.index(buf), kv_bytes)
                # Rows past the keys' end come back as zeros (the descriptor's bounds are this
                # head's); the consumers mask their scores.
                tma_load(k_desc, [off_b, off_hk, t * BLOCK_N, 0], ready.index(buf),
                         k_smem.index(buf))
                tma_load(v_desc, [off_b, off_hk, t * BLOCK_N, 0], ready.index(buf),
                         v_smem.index(buf))
                g += 1

    @gluon.jit
    def _n_tiles(start_m, N_K, causal_offset, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                 IS_CAUSAL: gl.constexpr):
        """The key tiles a query block sees."""
        if IS_CAUSAL:
            hi = gl.minimum(N_K, start_m + BLOCK_M + causal_offset)
        else:
            hi = N_K
        return (hi + BLOCK_N - 1) // BLOCK_N

    @gluon.jit
    def _tile(t, g, acc, p_op, m_i, l_i, s_zero, q, k_smem, v_smem, ready, free, my_turn,
              their_turn, rows, cols0, n_k, causal_offset, qk_scale, mask_it,
              FIRST_GROUP: gl.constexpr, PEELED: gl.constexpr, MASKED: gl.constexpr,
              IS_CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr,
              NUM_BUF: gl.constexpr, o_layout: gl.constexpr, NEW_ITEM: gl.constexpr = False):
        """Key tile t of the item, the program's g-th tile, for one consumer group: issue S[t] and
        P[t-1] V[t-1] on this group's turn, then the online-softmax step of S[t]. PEELED: t is
        the item's first tile, no P V before it. NEW_ITEM: t is the item's first tile, and the
        P V issued with it is the previous item's last, into `acc`, returned finished."""
        buf = g % NUM_BUF
        mbarrier.wait(ready.index(buf), phase=(g // NUM_BUF) & 1)
        # Turns alternate strictly (group 0 opens), so a group is at most one hand-over ahead
        # and the phase parity identifies the hand-over it waits for.
        if FIRST_GROUP:
            mbarrier.wait(my_turn, phase=(g + 1) & 1, pred=g >= 1)
        else:
            mbarrier.wait(my_turn, phase=g & 1)
        s = warpgroup_mma(q, k_smem.index(buf).reshape([BLOCK_N, D]).permute((1, 0)), s_zero,
                          use_acc=False, is_async=True)
        if not PEELED:
            prev = (g + NUM_BUF - 1) % NUM_BUF
            acc = warpgroup_mma(p_op, v_smem.index(prev).reshape([BLOCK_N, D]), acc,
                                is_async=True)
        mbarrier.arrive(their_turn)
        if PEELED:
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        else:
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))  # P V may still run
        if MASKED:
            # (mask_it: whether this tile needs it after all, known at run time; the mask costs
            # a quarter of a tile's softmax, which at head dim 64 is what the tile waits on.)
            if mask_it:
                cols = t * BLOCK_N + cols0
                keep = cols < n_k
                if IS_CAUSAL:
                    keep = keep & (cols <= rows + causal_offset)
                s = gl.where(keep, s, float("-inf"))
        # Every row sees a key in tile 0 (eligible() ensures it), so m_new is finite from the
        # first tile on and a fully masked later tile gives p = 0, alpha = 1.
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        if not PEELED:
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(free.index(prev))  # this group is done with tile t - 1
        if not NEW_ITEM:
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        p_op = gl.convert_layout(p.to(q.dtype),
                                 gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2))
        return acc, p_op, m_new, l_i

    @gluon.jit
    def _load_q(q_desc, q_smem, q_bar, k, n_m, BH, H, HALF: gl.constexpr,
                BLOCK_M: gl.constexpr, GROUP_M: gl.constexpr, D: gl.constexpr,
                PAIRED: gl.constexpr, IS_CAUSAL: gl.constexpr):
        """This group's half of the k-th item's query block, into its Q buffer."""
        bh, pid_m = _item(k, n_m, BH, PAIRED, IS_CAUSAL)
        mbarrier.expect(q_bar, GROUP_M * D * q_desc.dtype.primitive_bitwidth // 8)
        tma_load(q_desc, [bh // H, bh % H, pid_m * BLOCK_M + HALF * GROUP_M, 0], q_bar, q_smem)

    @gluon.jit
    def _epilogue(acc, m_i, l_i, bh, row0, q_smem, o_smem, o_desc, STATS, H, N_Q,
                  GROUP_M: gl.constexpr, D: gl.constexpr, O_IN_Q: gl.constexpr,
                  row_s: gl.constexpr, row_o: gl.constexpr):
        """An item's O (by a TMA store, which writes only the rows inside this head's N_Q) and
        its stats, as _forward.py writes them: lse, row max and log2(row sum), base 2."""
        o = acc / gl.expand_dims(gl.convert_layout(l_i, row_o), 1)
        # The staging buffer: Q's own where shared memory is short (head dim 128), else one of
        # its own, whose last store must have left it first.
        if O_IN_Q:
            q_smem.reshape([GROUP_M, D]).store(o.to(o_desc.dtype))
        else:
            tma.store_wait(pendings=0)
            o_smem.reshape([GROUP_M, D]).store(o.to(o_desc.dtype))
        fence_async_shared()
        if O_IN_Q:
            tma_store(o_desc, [bh // H, bh % H, row0, 0], q_smem)
        else:
            tma_store(o_desc, [bh // H, bh % H, row0, 0], o_smem)
        stats_ptr = STATS + bh.to(gl.int64) * 3 * N_Q
        log2_l = gl.log2(l_i)
        r = row0 + gl.arange(0, GROUP_M, layout=row_s)
        ok = r < N_Q
        gl.store(stats_ptr + r, m_i + log2_l, mask=ok)
        gl.store(stats_ptr + N_Q + r, m_i, mask=ok)
        gl.store(stats_ptr + 2 * N_Q + r, log2_l, mask=ok)

    @gluon.jit
    def _last_pv_and_epilogue(acc, p_op, m_i, l_i, g, bh, row0, v_smem, free, q_smem, o_smem,
                              o_desc, STATS, H, N_Q, GROUP_M: gl.constexpr, BLOCK_N: gl.constexpr,
                              D: gl.constexpr, NUM_BUF: gl.constexpr, O_IN_Q: gl.constexpr,
                              row_s: gl.constexpr, row_o: gl.constexpr):
        """An item's last P V (its tile is the program's (g-1)-th) on its own, then its epilogue."""
        last = (g - 1) % NUM_BUF
        acc = warpgroup_mma(p_op, v_smem.index(last).reshape([BLOCK_N, D]), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(free.index(last))
        _epilogue(acc, m_i, l_i, bh, row0, q_smem, o_smem, o_desc, STATS, H, N_Q, GROUP_M, D,
                  O_IN_Q, row_s, row_o)

    @gluon.jit
    def _consumer(q_desc, o_desc, STATS, q_smem, o_smem, k_smem, v_smem, q_bar, ready, free,
                  my_turn, their_turn, H, BH, n_m, N_Q, N_K, causal_offset, qk_scale,
                  FIRST_GROUP: gl.constexpr, IS_CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr,
                  GROUP_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr,
                  NUM_BUF: gl.constexpr, O_IN_Q: gl.constexpr, PAIRED: gl.constexpr,
                  CARRY: gl.constexpr, LEAN_TILE0: gl.constexpr):
        """One consumer group's items. CARRY: an item's last P V is issued with the next item's
        first S, and its epilogue runs after that tile's softmax, so that neither product waits
        alone (needs O's own staging buffer: the next item's Q is in Q's by then)."""
        dtype: gl.constexpr = o_desc.dtype
        HALF: gl.constexpr = 0 if FIRST_GROUP else 1
        # One warp group: 4 warps x 16 rows.
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        cols0 = gl.expand_dims(gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout)), 0)
        q = q_smem.reshape([GROUP_M, D])
        s_zero = gl.zeros([GROUP_M, BLOCK_N], gl.float32, layout=s_layout)
        o_zero = gl.zeros([GROUP_M, D], gl.float32, layout=o_layout)
        m_start = gl.full([GROUP_M], float("-inf"), gl.float32, layout=row_s)
        l_start = gl.zeros([GROUP_M], gl.float32, layout=row_s)
        n_mine = _n_mine(n_m, BH, PAIRED)
        if n_mine > 0:
            _load_q(q_desc, q_smem, q_bar, 0, n_m, BH, H, HALF, BLOCK_M, GROUP_M, D, PAIRED,
                    IS_CAUSAL)
        g = 0  # this program's key tiles so far, over all its items (the ring and the turns)
        # The item before, while its epilogue is pending (CARRY).
        acc = o_zero
        p_op = gl.zeros([GROUP_M, BLOCK_N], dtype, layout=p_layout)
        m_i = m_start
        l_i = l_start
        bh = 0
        row0 = 0
        for k in range(0, n_mine):
            prev_bh = bh
            prev_row0 = row0
            bh, pid_m = _item(k, n_m, BH, PAIRED, IS_CAUSAL)
            row0 = pid_m * BLOCK_M + HALF * GROUP_M
            start_m = pid_m * BLOCK_M
            n_tiles = _n_tiles(start_m, N_K, causal_offset, BLOCK_M, BLOCK_N, IS_CAUSAL)
            if IS_CAUSAL:
                full_tiles = gl.minimum(start_m + causal_offset + 1, N_K) // BLOCK_N
            else:
                full_tiles = N_K // BLOCK_N
            rows = gl.expand_dims(row0 + gl.arange(0, GROUP_M, layout=row_s), 1)
            mbarrier.wait(q_bar, phase=k & 1)
            # Tile 0 (masked where it is the key tail or on the diagonal: with LEAN_TILE0, only
            # then), then the tiles every row of the block sees whole, then the rest (the key
            # tail, the causal diagonal) masked.
            if LEAN_TILE0:
                mask0 = full_tiles < 1
            else:
                mask0 = True
            if CARRY:
                if k > 0:
                    done, p_op, m_new, l_new = _tile(
                        0, g, acc, p_op, m_start, l_start, s_zero, q, k_smem, v_smem, ready, free,
                        my_turn, their_turn, rows, cols0, N_K, causal_offset, qk_scale, mask0,
                        FIRST_GROUP, False, True, IS_CAUSAL, BLOCK_N, D, NUM_BUF, o_layout, True)
                    _epilogue(done, m_i, l_i, prev_bh, prev_row0, q_smem, o_smem, o_desc, STATS,
                              H, N_Q, GROUP_M, D, O_IN_Q, row_s, row_o)
                else:
                    _, p_op, m_new, l_new = _tile(
                        0, g, o_zero, p_op, m_start, l_start, s_zero, q, k_smem, v_smem, ready,
                        free, my_turn, their_turn, rows, cols0, N_K, causal_offset, qk_scale, mask0,
                        FIRST_GROUP, True, True, IS_CAUSAL, BLOCK_N, D, NUM_BUF, o_layout)
                acc = o_zero
                m_i = m_new
                l_i = l_new
            else:
                acc, p_op, m_i, l_i = _tile(0, g, o_zero, p_op, m_start, l_start, s_zero, q,
                                            k_smem, v_smem, ready, free, my_turn, their_turn, rows,
                                            cols0, N_K, causal_offset, qk_scale, mask0,
                                            FIRST_GROUP, True, True, IS_CAUSAL, BLOCK_N, D,
                                            NUM_BUF, o_layout)
            first_masked = gl.maximum(full_tiles, 1)
            for t in range(1, first_masked):
                acc, p_op, m_i, l_i = _tile(t, g + t, acc, p_op, m_i, l_i, s_zero, q, k_smem,
                                            v_smem, ready, free, my_turn, their_turn, rows, cols0,
                                            N_K, causal_offset, qk_scale, False, FIRST_GROUP,
                                            False, False, IS_CAUSAL, BLOCK_N, D, NUM_BUF,
                                            o_layout)
            for t in range(first_masked, n_tiles):
                acc, p_op, m_i, l_i = _tile(t, g + t, acc, p_op, m_i, l_i, s_zero, q, k_smem,
                                            v_smem, ready, free, my_turn, their_turn, rows, cols0,
                                            N_K, causal_offset, qk_scale, True, FIRST_GROUP,
                                            False, True, IS_CAUSAL, BLOCK_N, D, NUM_BUF,
                                            o_layout)
            g += n_tiles
            if not O_IN_Q:
                # Every S of this item is done, so Q's buffer is free: the next item's queries
                # load while this one's last P V and its epilogue run.
                if k + 1 < n_mine:
                    _load_q(q_desc, q_smem, q_bar, k + 1, n_m, BH, H, HALF, BLOCK_M, GROUP_M, D,
                            PAIRED, IS_CAUSAL)
            if not CARRY:
                _last_pv_and_epilogue(acc, p_op, m_i, l_i, g, bh, row0, v_smem, free, q_smem,
                                      o_smem, o_desc, STATS, H, N_Q, GROUP_M, BLOCK_N, D, NUM_BUF,
                                      O_IN_Q, row_s, row_o)
                if O_IN_Q:
                    tma.store_wait(pendings=0)
                    if k + 1 < n_mine:
                        _load_q(q_desc, q_smem, q_bar, k + 1, n_m, BH, H, HALF, BLOCK_M, GROUP_M,
                                D, PAIRED, IS_CAUSAL)
        if CARRY:
            if n_mine > 0:  # the last item's
                _last_pv_and_epilogue(acc, p_op, m_i, l_i, g, bh, row0, v_smem, free, q_smem,
                                      o_smem, o_desc, STATS, H, N_Q, GROUP_M, BLOCK_N, D, NUM_BUF,
                                      O_IN_Q, row_s, row_o)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _fwd_hopper_kernel(q_desc, k_desc, v_desc, o_desc, STATS, H, GROUP, BH, N_Q, N_K,
                           causal_offset, qk_scale,
                           BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr,
                           IS_CAUSAL: gl.constexpr, NUM_BUF: gl.constexpr, O_IN_Q: gl.constexpr,
                           PAIRED: gl.constexpr, CARRY: gl.constexpr,
                           LEAN_TILE0: gl.constexpr, WORKER_REGS: gl.constexpr,
                           num_warps: gl.constexpr):
        """Program p takes units of work p, p + programs, ... (_item): one each when the grid has
        one program per unit, several when it is persistent (one program per SM)."""
        GROUP_M: gl.constexpr = BLOCK_M // 2
        dtype: gl.constexpr = q_desc.dtype
        n_m = (N_Q + BLOCK_M - 1) // BLOCK_M
        q_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, GROUP_M, D], q_desc.layout)
        if O_IN_Q:
            o_smem = q_smem  # unused: O is staged in each group's Q buffer
        else:
            o_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, GROUP_M, D], o_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, 1, 1, BLOCK_N, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, 1, 1, BLOCK_N, D], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        free = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(q_bar.index(i), count=1)
            mbarrier.init(turn.index(i), count=1)
        for i in gl.static_range(NUM_BUF):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(free.index(i), count=2)  # both groups release a buffer
        fence_async_shared()
        gl.warp_specialize([
            (_consumer, (q_desc, o_desc, STATS, q_smem.index(0), o_smem.index(0), k_smem, v_smem,
                         q_bar.index(0), ready, free, turn.index(0), turn.index(1), H, BH, n_m,
                         N_Q, N_K, causal_offset, qk_scale, True, IS_CAUSAL, BLOCK_M, GROUP_M,
                         BLOCK_N, D, NUM_BUF, O_IN_Q, PAIRED, CARRY, LEAN_TILE0)),
            (_consumer, (q_desc, o_desc, STATS, q_smem.index(1), o_smem.index(1), k_smem, v_smem,
                         q_bar.index(1), ready, free, turn.index(1), turn.index(0), H, BH, n_m,
                         N_Q, N_K, causal_offset, qk_scale, False, IS_CAUSAL, BLOCK_M, GROUP_M,
                         BLOCK_N, D, NUM_BUF, O_IN_Q, PAIRED, CARRY, LEAN_TILE0)),
            (_producer, (k_desc, v_desc, k_smem, v_smem, ready, free, H, GROUP, BH, n_m, N_K,
                         causal_offset, BLOCK_M, BLOCK_N, D, IS_CAUSAL, NUM_BUF, PAIRED)),
        ], [4, 1], WORKER_REGS)


def eligible(q, k, v, mask, kpm, dropout_p, varlen, causal, causal_offset, scale) -> bool:
    """Whether this kernel serves the call; otherwise _forward.py does."""
    # The length first: it turns most short calls away at the cost of a dict lookup (the
    # checks of plain_call add host time to every call of a host-bound short model).
    floor = MIN_LENGTH.get((q.shape[3], bool(causal)))
    if not ENABLED or floor is None or min(q.shape[2], k.shape[2]) < floor:
        return False
    return plain_call(q, k, v, mask, kpm, dropout_p, varlen, causal, causal_offset, scale)


def attention_forward(q, k, v, causal, causal_offset, scale, config=None, launches=ONCE):
    """(O with q's layout, stats fp32 (B, H, 3, N_Q)) as _forward.attention_forward returns them.
    `config` (for experiments) replaces entries of CONFIG. `launches`: a plan's
    (_hopper.Launches), for calls of one signature."""
    cfg = {**CONFIG, **(config or {})}
    B, H, N_Q, D = q.shape
    N_K = k.shape[2]
    o = torch.empty_like(q)
    if not tma_ok(o):  # empty_like keeps q's strides, but not those of an overlapping q
        o = torch.empty((B, H, N_Q, D), device=q.device, dtype=q.dtype)
    o, stats = _common.forward_outputs(q, o)
    block_n = cfg["BLOCK_N"]
    n_m = -(-N_Q // BLOCK_M)
    # Causal query blocks see from 1 to n_m key tiles; paired (j with n_m - 1 - j), every unit of
    # work has the same n_m + 1, so programs that take units in turn finish together, and units
    # go in head order, so the programs running at once share K and V in L2.
    paired = bool(causal) and cfg["PAIRED"] and n_m % 2 == 0
    units = n_m * B * H // (2 if paired else 1)
    # Any grid computes the same result (programs stride over the units), so a plan that keeps
    # its first call's grid stays right if an experiment changes PERSISTENT between calls.
    programs = min(units, sm_count(q.device)) if cfg["PERSISTENT"] else units
    # O's staging buffer of its own lets the next item's queries load during an item's epilogue;
    # at head dim 128 the K/V ring leaves no room for it, and O is staged in Q's buffer.
    smem = (2 * BLOCK_M * D + 2 * cfg["NUM_BUF"] * block_n * D) * q.element_size()
    o_in_q = smem > SMEM_FOR_SEPARATE_O
    extra = {} if cfg["maxnreg"] is None else {"maxnreg": cfg["maxnreg"]}
    launches(
        "main", _fwd_hopper_kernel, (programs,),
        (launches.descriptor("q", q, GROUP_M), launches.descriptor("k", k, block_n),
         launches.descriptor("v", v, block_n), launches.descriptor("o", o, GROUP_M), stats, H,
         H // k.shape[1], B * H, N_Q, N_K, causal_offset, scale * _common.LOG2E),
        dict(BLOCK_M=BLOCK_M, BLOCK_N=block_n, D=D, IS_CAUSAL=bool(causal),
             NUM_BUF=cfg["NUM_BUF"], O_IN_Q=o_in_q, PAIRED=paired,
             CARRY=cfg["CARRY"] and not o_in_q, LEAN_TILE0=cfg["LEAN_TILE0"] and D == 64,
             WORKER_REGS=cfg["WORKER_REGS"], num_warps=4,
             enable_fp_fusion=_common.fp_fusion(q.dtype), **extra))
    return o, stats
