# Load balancing: the pickers of a candidate set (docs/routing.md), one per
# policy (LB_* in route.pxd).  Included by route.pyx, so that a pick is inlined
# into rt_route in the same C unit; the pick structures are fields of CandSet.
#
#   lb_build_seq    round robin: the smooth weighted sequence
#   lb_build_alias  random / least request: Vose alias tables
#   lb_build_ring   consistent hash: the sorted ring of points
#   lb_prepare      (re)build what a set's policy needs (warm-up aware)
#   lb_draw         one weighted random draw
#   lb_pick         the pick itself, by policy


cdef int lb_build_seq(CandSet cs) except -1:
    """Smooth weighted RR: node i's k-th turn sits at (k + phase_i) / count_i of
    the cycle (stride scheduling).  The turns are ordered by a counting sort on
    that position (O(L + n), no comparison sort: builds stay cheap)."""
    cdef Py_ssize_t n = cs.n, i, k, total = 0, cap, b
    cdef int64_t g = 0, a, r, W = 0
    cdef int64_t* cnt = <int64_t*>malloc(n * sizeof(int64_t))
    cdef Py_ssize_t* start
    if not cnt:
        raise MemoryError()
    for i in range(n):
        a = cs.eff[i]
        W += a
        r = g
        while r:
            a, r = r, a % r
        g = a
    cap = RT_SEQ_PER_NODE * n
    if cap < 1024:
        cap = 1024
    for i in range(n):
        if W // g > cap:
            # too long a cycle: scale to ~cap slots, every node keeps >= 1
            cnt[i] = <int64_t>(<double>cs.eff[i] * cap / <double>W + 0.5)
            if cnt[i] < 1:
                cnt[i] = 1
        else:
            cnt[i] = cs.eff[i] // g
        total += cnt[i]
    start = <Py_ssize_t*>calloc(total + 1, sizeof(Py_ssize_t))
    free(cs.seq)
    cs.seq = <uint32_t*>malloc(total * sizeof(uint32_t))
    if not start or not cs.seq:
        free(cnt)
        free(start)
        raise MemoryError()
    # turn k of node i sits at (k + phase_i) / cnt_i of the cycle, phase_i =
    # (i + 1/2) / n: staggering the phases keeps equal-count nodes from
    # bunching at the same spot.  Bucket: floor(position * total) in [0, total).
    for i in range(n):
        for k in range(cnt[i]):
            start[((2 * (k * n + i) + 1) * total) // (2 * cnt[i] * n) + 1] += 1
    for b in range(total):
        start[b + 1] += start[b]
    for i in range(n):
        for k in range(cnt[i]):
            b = ((2 * (k * n + i) + 1) * total) // (2 * cnt[i] * n)
            cs.seq[start[b]] = <uint32_t>i
            start[b] += 1
    cs.seq_len = total
    free(start)
    free(cnt)
    return 0


cdef int lb_build_alias(CandSet cs) except -1:
    """Vose's alias method over the effective weights: O(1) weighted draws."""
    cdef Py_ssize_t n = cs.n, i, ns = 0, nl = 0, s, l
    cdef double W = 0.0
    cdef double* p = <double*>malloc(n * sizeof(double))
    cdef Py_ssize_t* small = <Py_ssize_t*>malloc(n * sizeof(Py_ssize_t))
    cdef Py_ssize_t* large = <Py_ssize_t*>malloc(n * sizeof(Py_ssize_t))
    free(cs.alias_prob)
    free(cs.alias_idx)
    cs.alias_prob = <uint32_t*>malloc(n * sizeof(uint32_t))
    cs.alias_idx = <uint32_t*>malloc(n * sizeof(uint32_t))
    if not p or not small or not large or not cs.alias_prob or not cs.alias_idx:
        free(p)
        free(small)
        free(large)
        raise MemoryError()
    for i in range(n):
        W += <double>cs.eff[i]
    for i in range(n):
        p[i] = <double>cs.eff[i] * n / W
        if p[i] < 1.0:
            small[ns] = i
            ns += 1
        else:
            large[nl] = i
            nl += 1
    while ns > 0 and nl > 0:
        ns -= 1
        s = small[ns]
        l = large[nl - 1]
        cs.alias_prob[s] = <uint32_t>(p[s] * 4294967296.0) if p[s] < 1.0 else 0xFFFFFFFFu
        cs.alias_idx[s] = <uint32_t>l
        p[l] = (p[l] + p[s]) - 1.0
        if p[l] < 1.0:
            nl -= 1
            small[ns] = l
            ns += 1
    while nl > 0:
        nl -= 1
        cs.alias_prob[large[nl]] = 0xFFFFFFFFu
        cs.alias_idx[large[nl]] = <uint32_t>large[nl]
    while ns > 0:
        ns -= 1
        cs.alias_prob[small[ns]] = 0xFFFFFFFFu
        cs.alias_idx[small[ns]] = <uint32_t>small[ns]
    free(p)
    free(small)
    free(large)
    return 0


cdef int lb_build_ring(CandSet cs) except -1:
    """Ring hash: node i owns round(RT_RING_POINTS * w_i / w_max) points at
    xxh64(address, seed=k).  A point depends only on its own node, so a node
    leaving moves only its own keys (unless it was the heaviest)."""
    cdef Py_ssize_t n = cs.n, i, k, total = 0, j = 0
    cdef int64_t wmax = 1
    cdef Node nd
    cdef bytes ab
    cdef Py_ssize_t* pts = <Py_ssize_t*>malloc(n * sizeof(Py_ssize_t))
    cdef rt_point* ring
    if not pts:
        raise MemoryError()
    for i in range(n):
        if cs.eff[i] > wmax:
            wmax = cs.eff[i]
    for i in range(n):
        pts[i] = <Py_ssize_t>(<double>RT_RING_POINTS * cs.eff[i] / <double>wmax + 0.5)
        if pts[i] < 1:
            pts[i] = 1
        total += pts[i]
    ring = <rt_point*>malloc(total * sizeof(rt_point))
    if not ring:
        free(pts)
        raise MemoryError()
    for i in range(n):
        nd = <Node>cs.nodes[i]
        ab = nd.addr_b
        for k in range(pts[i]):
            ring[j].h = rt_xxh64(<const uint8_t*><char*>ab, len(ab), <uint64_t>k)
            ring[j].idx = <uint32_t>i
            j += 1
    qsort(ring, total, sizeof(rt_point), rt_point_cmp)
    free(cs.ring_hash)
    free(cs.ring_idx)
    cs.ring_hash = <uint64_t*>malloc(total * sizeof(uint64_t))
    cs.ring_idx = <uint32_t*>malloc(total * sizeof(uint32_t))
    if not cs.ring_hash or not cs.ring_idx:
        free(ring)
        free(pts)
        raise MemoryError()
    for j in range(total):
        cs.ring_hash[j] = ring[j].h
        cs.ring_idx[j] = ring[j].idx
    cs.ring_len = total
    free(ring)
    free(pts)
    return 0


cdef int lb_prepare(CandSet cs, double now, uint64_t* rng) except -1:
    """(Re)build the pick structures from the weights at `now`."""
    cdef Py_ssize_t i
    cdef bint warming = False, uniform = True
    for i in range(cs.n):
        cs.eff[i] = rt_warm_weight(cs.weight[i], cs.warm_start[i], cs.warm_len[i], now)
        if cs.warm_len[i] > 0.0 and now - cs.warm_start[i] < cs.warm_len[i]:
            warming = True
        if cs.eff[i] != cs.eff[0]:
            uniform = False
    cs.warming = warming
    cs.uniform = uniform
    cs.prepared_at = now
    if cs.policy == LB_ROUND_ROBIN:
        if uniform:
            cs.seq_len = cs.n
        else:
            lb_build_seq(cs)
        # random offset per proxy and per candidate set/version; a warm-up
        # recompute keeps the current position
        if cs.pos < 0:
            cs.pos = <Py_ssize_t>rt_below(rt_rand(rng), <uint32_t>cs.seq_len)
        elif cs.pos >= cs.seq_len:
            cs.pos = cs.pos % cs.seq_len
    elif cs.policy == LB_CONSISTENT_HASH:
        # the ring (n * 160 points, sorted) is built by the first hashed pick:
        # a full build of many hash services would otherwise pay for rings
        # nobody uses yet
        cs.ring_len = 0
        if not uniform:
            lb_build_alias(cs)
    elif not uniform:
        lb_build_alias(cs)
    cs.prepared = True
    return 0


cdef inline Py_ssize_t lb_draw(CandSet cs, uint64_t* rng) noexcept:
    """One weighted random draw (alias method; plain uniform when weights are equal)."""
    cdef uint64_t r = rt_rand(rng)
    cdef uint32_t i = rt_below(r, <uint32_t>cs.n)
    if cs.uniform:
        return i
    if <uint32_t>r < cs.alias_prob[i]:
        return i
    return cs.alias_idx[i]


cdef inline Py_ssize_t lb_pick(CandSet cs, uint64_t* rng,
                               const uint8_t* hk, Py_ssize_t hkl) except -1:
    """Index of the picked node; cs is prepared and non-empty."""
    cdef Py_ssize_t i, j, k, lo, hi, mid
    cdef uint64_t h
    cdef Node a, b
    if cs.n == 1:
        return 0
    if cs.policy == LB_ROUND_ROBIN:
        k = cs.pos
        cs.pos = k + 1
        if cs.pos >= cs.seq_len:
            cs.pos = 0
        if cs.uniform:
            return k
        return cs.seq[k]
    if cs.policy == LB_LEAST_REQUEST:
        # two distinct draws, each proportional to weight; the one with fewer
        # requests in flight per unit of weight wins, the first on a tie (so an
        # idle set is picked exactly in weight proportion)
        i = lb_draw(cs, rng)
        j = i
        for k in range(4):
            j = lb_draw(cs, rng)
            if j != i:
                break
        if j == i:
            j = rt_below(rt_rand(rng), <uint32_t>(cs.n - 1))
            if j >= i:
                j += 1
        a = <Node>cs.nodes[i]
        b = <Node>cs.nodes[j]
        if <double>b.in_flight * <double>cs.eff[i] < <double>a.in_flight * <double>cs.eff[j]:
            return j
        return i
    if cs.policy == LB_CONSISTENT_HASH and hkl >= 0:
        if cs.ring_len == 0:
            lb_build_ring(cs)
        h = rt_xxh64(hk, hkl, 0)
        lo = 0
        hi = cs.ring_len
        while lo < hi:
            mid = (lo + hi) >> 1
            if cs.ring_hash[mid] < h:
                lo = mid + 1
            else:
                hi = mid
        if lo == cs.ring_len:
            lo = 0
        return cs.ring_idx[lo]
    # random, and consistent hash without a hash key
    return lb_draw(cs, rng)
