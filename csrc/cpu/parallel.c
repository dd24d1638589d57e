/*
 * A small fork-join pool: the caller and n_threads - 1 workers take tasks from one atomic
 * counter, so uneven tasks balance themselves.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

#include "cpu.h"

struct sals_pool {
  int32_t n_threads;
  pthread_t* workers;
  int32_t n_started;
  pthread_mutex_t mu;
  pthread_cond_t wake;
  pthread_cond_t done;
  uint64_t generation; /* bumped per run; workers wait for a change */
  int32_t busy;        /* workers still in the current run */
  int stop;
  sals_task_fn fn;
  void* ctx;
  int64_t n_tasks;
  atomic_llong next;
};

typedef struct {
  sals_pool_t* pool;
  int32_t thread;
} worker_arg_t;

int32_t sals_online_cores(void) {
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n < 1 ? 1 : (int32_t)(n > 1024 ? 1024 : n);
}

static void drain(sals_pool_t* p, int32_t thread) {
  for (;;) {
    long long t = atomic_fetch_add_explicit(&p->next, 1, memory_order_relaxed);
    if (t >= p->n_tasks) return;
    p->fn(p->ctx, (int64_t)t, thread);
  }
}

static void* worker_main(void* arg) {
  sals_pool_t* p = ((worker_arg_t*)arg)->pool;
  int32_t thread = ((worker_arg_t*)arg)->thread;
  free(arg);
  uint64_t seen = 0;
  pthread_mutex_lock(&p->mu);
  for (;;) {
    while (!p->stop && p->generation == seen) pthread_cond_wait(&p->wake, &p->mu);
    if (p->stop) break;
    seen = p->generation;
    pthread_mutex_unlock(&p->mu);
    drain(p, thread);
    pthread_mutex_lock(&p->mu);
    if (--p->busy == 0) pthread_cond_signal(&p->done);
  }
  pthread_mutex_unlock(&p->mu);
  return NULL;
}

sals_pool_t* sals_pool_create(int32_t n_threads) {
  if (n_threads < 1) n_threads = 1;
  sals_pool_t* p = (sals_pool_t*)calloc(1, sizeof *p);
  if (!p) return NULL;
  p->n_threads = 1;
  pthread_mutex_init(&p->mu, NULL);
  pthread_cond_init(&p->wake, NULL);
  pthread_cond_init(&p->done, NULL);
  atomic_init(&p->next, 0);
  if (n_threads > 1) {
    p->workers = (pthread_t*)calloc((size_t)n_threads - 1, sizeof(pthread_t));
    if (!p->workers) {
      sals_pool_destroy(p);
      return NULL;
    }
    for (int32_t i = 1; i < n_threads; ++i) {
      worker_arg_t* a = (worker_arg_t*)malloc(sizeof *a);
      if (!a) break;
      a->pool = p;
      a->thread = i;
      if (pthread_create(&p->workers[p->n_started], NULL, worker_main, a) != 0) {
        free(a);
        break;
      }
      p->n_started++;
    }
    /* Fewer threads than asked is still a working pool. */
    p->n_threads = 1 + p->n_started;
  }
  return p;
}

void sals_pool_destroy(sals_pool_t* p) {
  if (!p) return;
  pthread_mutex_lock(&p->mu);
  p->stop = 1;
  pthread_cond_broadcast(&p->wake);
  pthread_mutex_unlock(&p->mu);
  for (int32_t i = 0; i < p->n_started; ++i) pthread_join(p->workers[i], NULL);
  free(p->workers);
  pthread_cond_destroy(&p->done);
  pthread_cond_destroy(&p->wake);
  pthread_mutex_destroy(&p->mu);
  free(p);
}

int32_t sals_pool_size(const sals_pool_t* p) { return p ? p->n_threads : 1; }

void sals_pool_run(sals_pool_t* p, int64_t n_tasks, sals_task_fn fn, void* ctx) {
  if (n_tasks <= 0) return;
  if (!p || p->n_started == 0 || n_tasks == 1) {
    for (int64_t t = 0; t < n_tasks; ++t) fn(ctx, t, 0);
    return;
  }
  pthread_mutex_lock(&p->mu);
  p->fn = fn;
  p->ctx = ctx;
  p->n_tasks = n_tasks;
  atomic_store(&p->next, 0);
  p->busy = p->n_started;
  p->generation++;
  pthread_cond_broadcast(&p->wake);
  pthread_mutex_unlock(&p->mu);
  drain(p, 0);
  pthread_mutex_lock(&p->mu);
  while (p->busy > 0) pthread_cond_wait(&p->done, &p->mu);
  pthread_mutex_unlock(&p->mu);
}

void sals_parallel_for(int64_t n_tasks, double flops, sals_task_fn fn, void* ctx) {
  /* Starting a thread costs tens of microseconds: only worth it for a few MFLOP per thread. */
  int64_t n = sals_online_cores();
  if (n > n_tasks) n = n_tasks;
  if (n > 1 && flops / (double)n < 2e6) n = 1;
  sals_pool_t* p = n > 1 ? sals_pool_create((int32_t)n) : NULL;
  sals_pool_run(p, n_tasks, fn, ctx);
  sals_pool_destroy(p);
}
