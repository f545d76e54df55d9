/* Helpers shared by the syncbnd unit tests that need no sockets
 * (tests/svc_codec_test.c, tests/svc_state_metrics_test.c,
 * tests/svc_worker_test.c): building msgpack request bodies and reading the
 * worker's replies. */
#ifndef SBN_SVC_TESTUTIL_H
#define SBN_SVC_TESTUTIL_H

#include <stddef.h>
#include <stdint.h>

#include <msgpack.h>

#include "svc_worker.h"

/* An error of the service's convention kept for assertions: the code of
 * a negative return and the message of svc_last_error(), copied at once. */
typedef struct tu_err_s {
  svc_code_t code;
  char msg[1024];
} tu_err_t;

/* Fills e from rc (0 or a negative service code) and returns 0 for 0, -1
 * otherwise, so `assert_int_equal(tu_err(svc_scan(...), &e), -1)` reads as
 * the old out-parameter checks did. */
int tu_err(int rc, tu_err_t *e);

/* A request body being packed. */
typedef struct tu_body_s {
  msgpack_sbuffer sb;
  msgpack_packer pk;
} tu_body_t;

void tu_body_init(tu_body_t *b);
/* Packs k as a msgpack str (map keys and string values alike). */
void tu_key(tu_body_t *b, const char *k);
void tu_boolean(tu_body_t *b, int v);
/* Starts b as a register request (id 1) of layer name of kind: a map of
 * 4 + more keys, of which op, id, name and kind are packed; the caller
 * packs the other more (channels, eps, ...). */
void tu_register_head(tu_body_t *b, size_t more, const char *name,
                      const char *kind);
/* A tensor map {dtype, shape, [layout,] data} with bytes bytes of payload;
 * layout NULL leaves the key out. */
void tu_tensor(tu_body_t *b, const char *dtype, int ndim, const size_t *dims,
               const char *layout, const void *data, size_t bytes);

/* A worker's reply frame and its unpacked map; code and msg hold the
 * error's code and message ("" on success) where the runner fills them. */
typedef struct tu_reply_s {
  uint8_t *buf;
  size_t len;
  int close_after;
  msgpack_zone z;
  msgpack_object o;
  char code[64];
  char msg[256];
} tu_reply_t;

/* The value at string key k of map m, or NULL; asserts m is a map. */
const msgpack_object *tu_get(const msgpack_object *m, const char *k);
/* The value at key k, which must be there as an unsigned integer. */
uint64_t tu_get_u64(const msgpack_object *m, const char *k);
/* The value at key k, which must be there as a float. */
double tu_get_f64(const msgpack_object *m, const char *k);
/* Runs body b through w (and frees b), unpacks the reply into r and
 * returns its error code ("" on success), with the message in r->msg. */
const char *tu_run(svc_worker_t *w, tu_body_t *b, tu_reply_t *r);
void tu_reply_free(tu_reply_t *r);

#endif
