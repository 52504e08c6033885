/* A numpy allocator that keeps freed large buffers for reuse.
 *
 * A process whose glibc mmap threshold is fixed (dask sets
 * MALLOC_TRIM_THRESHOLD_ for its workers, which freezes the threshold at
 * 128 KiB) maps every large array afresh and page-faults it in on first
 * touch; a search that allocates the same temporaries call after call pays
 * that every time. Blocks of at least POOL_MIN_BYTES freed here are kept in
 * a few slots, by size class (eight per power of two), and handed out again
 * for a request of the same class. The pool holds at most pool_cap bytes,
 * and a block not taken again within POOL_KEEP_EPOCHS epochs (one per
 * pooled task, see pool_new_epoch) goes back to the system.
 *
 * Every block, small or large, starts with a header that says its class,
 * so that free and realloc never depend on the size numpy passes.
 */
#ifndef ANNLEARN_POOL_H
#define ANNLEARN_POOL_H

#include <Python.h>
#include <pythread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define POOL_HEADER 64 /* keeps the data as aligned as malloc's */
#define POOL_MIN_BYTES ((size_t)128 * 1024)
#define POOL_SLOTS 128
#define POOL_KEEP_EPOCHS 16

typedef struct {
    size_t bytes;     /* whole block, header included; 0: not pooled */
    size_t requested; /* the caller's size, for realloc's copy */
} pool_header;

typedef struct {
    char *block;
    size_t bytes;
    uint64_t epoch;
} pool_slot;

static pool_slot pool_slots[POOL_SLOTS];
static size_t pool_cached = 0;
static size_t pool_cap = (size_t)256 << 20;
static uint64_t pool_epoch = 0;
static PyThread_type_lock pool_lock = NULL;

/* The smallest class size (eight classes per power of two) holding n. */
static size_t pool_class_bytes(size_t n) {
    size_t power = 1;
    while (power <= n / 2) power <<= 1; /* the largest power of two <= n */
    size_t step = power >= 8 ? power >> 3 : 1;
    return (n + step - 1) / step * step;
}

static void pool_release(pool_slot *slot) {
    free(slot->block);
    pool_cached -= slot->bytes;
    slot->block = NULL;
    slot->bytes = 0;
}

/* Drop the blocks not reused for POOL_KEEP_EPOCHS epochs; start an epoch. */
static void pool_new_epoch(void) {
    PyThread_acquire_lock(pool_lock, WAIT_LOCK);
    pool_epoch++;
    for (int i = 0; i < POOL_SLOTS; i++) {
        if (pool_slots[i].block && pool_slots[i].epoch + POOL_KEEP_EPOCHS < pool_epoch)
            pool_release(&pool_slots[i]);
    }
    PyThread_release_lock(pool_lock);
}

static void pool_clear(void) {
    PyThread_acquire_lock(pool_lock, WAIT_LOCK);
    for (int i = 0; i < POOL_SLOTS; i++) {
        if (pool_slots[i].block) pool_release(&pool_slots[i]);
    }
    PyThread_release_lock(pool_lock);
}

/* A cached block of exactly `bytes`, or NULL. */
static char *pool_take(size_t bytes) {
    char *block = NULL;
    PyThread_acquire_lock(pool_lock, WAIT_LOCK);
    for (int i = 0; i < POOL_SLOTS; i++) {
        if (pool_slots[i].block && pool_slots[i].bytes == bytes) {
            block = pool_slots[i].block;
            pool_slots[i].block = NULL;
            pool_slots[i].bytes = 0;
            pool_cached -= bytes;
            break;
        }
    }
    PyThread_release_lock(pool_lock);
    return block;
}

/* Keep a freed block (evicting the oldest ones to stay under the cap), or
 * free it when it alone is more than half the cap. */
static void pool_keep(char *block, size_t bytes) {
    if (bytes > pool_cap / 2) {
        free(block);
        return;
    }
    PyThread_acquire_lock(pool_lock, WAIT_LOCK);
    int empty = -1;
    for (;;) {
        int oldest = -1;
        empty = -1;
        for (int i = 0; i < POOL_SLOTS; i++) {
            if (!pool_slots[i].block) {
                if (empty < 0) empty = i;
            } else if (oldest < 0 || pool_slots[i].epoch < pool_slots[oldest].epoch) {
                oldest = i;
            }
        }
        if (empty >= 0 && pool_cached + bytes <= pool_cap) break;
        pool_release(&pool_slots[oldest]);
    }
    pool_slots[empty].block = block;
    pool_slots[empty].bytes = bytes;
    pool_slots[empty].epoch = pool_epoch;
    pool_cached += bytes;
    PyThread_release_lock(pool_lock);
}

static void *pool_finish(char *block, size_t bytes, size_t requested) {
    if (!block) return NULL;
    pool_header *header = (pool_header *)block;
    header->bytes = bytes;
    header->requested = requested;
    return block + POOL_HEADER;
}

static void *pool_malloc(void *ctx, size_t size) {
    (void)ctx;
    if (size > SIZE_MAX - 2 * POOL_HEADER) return NULL;
    if (size < POOL_MIN_BYTES) return pool_finish(malloc(size + POOL_HEADER), 0, size);
    size_t bytes = pool_class_bytes(size + POOL_HEADER);
    char *block = pool_take(bytes);
    if (!block) block = malloc(bytes);
    return pool_finish(block, bytes, size);
}

static void *pool_calloc(void *ctx, size_t nelem, size_t elsize) {
    (void)ctx;
    if (elsize && nelem > (SIZE_MAX - 2 * POOL_HEADER) / elsize) return NULL;
    size_t size = nelem * elsize;
    if (size < POOL_MIN_BYTES) return pool_finish(calloc(1, size + POOL_HEADER), 0, size);
    size_t bytes = pool_class_bytes(size + POOL_HEADER);
    char *block = pool_take(bytes);
    if (block) {
        memset(block + POOL_HEADER, 0, size);
        return pool_finish(block, bytes, size);
    }
    /* A fresh block comes zeroed (and unfaulted) from the system. */
    return pool_finish(calloc(1, bytes), bytes, size);
}

static void pool_free(void *ctx, void *ptr, size_t size) {
    (void)ctx;
    (void)size;
    if (!ptr) return;
    char *block = (char *)ptr - POOL_HEADER;
    size_t bytes = ((pool_header *)block)->bytes;
    if (bytes) pool_keep(block, bytes);
    else free(block);
}

static void *pool_realloc(void *ctx, void *ptr, size_t new_size) {
    if (!ptr) return pool_malloc(ctx, new_size);
    char *block = (char *)ptr - POOL_HEADER;
    pool_header *header = (pool_header *)block;
    if (!header->bytes && new_size < POOL_MIN_BYTES) {
        block = realloc(block, new_size + POOL_HEADER);
        return pool_finish(block, 0, new_size);
    }
    void *moved = pool_malloc(ctx, new_size);
    if (!moved) return NULL;
    memcpy(moved, ptr, header->requested < new_size ? header->requested : new_size);
    pool_free(ctx, ptr, header->requested);
    return moved;
}

#endif
