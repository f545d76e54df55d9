/* The .npy reader and writer: round trips, float64 conversion, other header
 * versions, and every malformed file the reader must refuse with
 * SBN_EFORMAT (or SBN_EIO) and a message that names the file. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "sbn_npy.h"
#include "sbn_state.h"
#include "testutil.h"

static char g_dir[64];

static int setup(void **state) {
  (void)state;
  strcpy(g_dir, "/tmp/sbn_npy_test.XXXXXX");
  return mkdtemp(g_dir) == NULL ? -1 : 0;
}

static int teardown(void **state) {
  (void)state;
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
  return system(cmd) == 0 ? 0 : -1;
}

static const char *tpath(const char *name) {
  static char buf[4][256];
  static int k;
  char *p = buf[k++ % 4];
  snprintf(p, 256, "%s/%s", g_dir, name);
  return p;
}

/* Writes a .npy file by hand: magic, version, the dict padded with spaces
 * and a newline to a multiple of 64 bytes, then nbytes of data. */
static void write_raw(const char *path, int major, const char *dict,
                      const void *data, size_t nbytes) {
  size_t pre = major == 1 ? 10 : 12, dl = strlen(dict);
  size_t total = (pre + dl + 1 + 63) / 64 * 64, hlen = total - pre;
  FILE *f = fopen(path, "wb");
  assert_non_null(f);
  fwrite("\x93NUMPY", 1, 6, f);
  fputc(major, f);
  fputc(0, f);
  fputc((int)(hlen & 0xff), f);
  fputc((int)((hlen >> 8) & 0xff), f);
  if (major != 1) {
    fputc(0, f);
    fputc(0, f);
  }
  fwrite(dict, 1, dl, f);
  for (size_t i = pre + dl; i + 1 < total; i++)
    fputc(' ', f);
  fputc('\n', f);
  if (nbytes > 0)
    fwrite(data, 1, nbytes, f);
  assert_int_equal(fclose(f), 0);
}

static void clear_error(void) {
  sbn_op_t op;
  (void)sbn_op_parse("__none__", &op);
}

/* Reading path must fail with code, name the file, and mention token. */
static void expect_refused(const char *path, int code, const char *token) {
  sbn_npy_t t;
  clear_error();
  int rc = sbn_npy_read(path, &t);
  const char *msg = sbn_last_error();
  if (rc != code)
    fail_msg("%s: got %s, expected %s (%s)", path, sbn_err_name(rc),
             sbn_err_name(code), msg);
  if (strstr(msg, path) == NULL || strstr(msg, token) == NULL)
    fail_msg("%s: message '%s' does not name the file and '%s'", path, msg,
             token);
  assert_null(t.data);
  assert_int_equal(t.ndim, 0);
}

static void test_round_trip(void **state) {
  (void)state;
  tu_rng_t r;
  tu_rng_seed(&r, 7);
  size_t dims[3] = {3, 5, 7};
  float a[105];
  tu_fill_normal(&r, a, 105, 1e4, 3.0);
  a[4] = -0.0f;
  a[5] = 1e-40f; /* a subnormal survives bit for bit */
  const char *p = tpath("rt.npy");
  assert_int_equal(sbn_npy_write(p, a, 3, dims), 0);
  struct stat st;
  assert_int_equal(stat(p, &st), 0);
  /* NumPy's 64-byte alignment of the data. */
  assert_int_equal((size_t)st.st_size % 64, (105 * 4) % 64);
  assert_true((size_t)st.st_size - 105 * 4 >= 64);
  sbn_npy_t t;
  assert_int_equal(sbn_npy_read(p, &t), 0);
  assert_int_equal(t.ndim, 3);
  assert_int_equal(t.dims[0], 3);
  assert_int_equal(t.dims[1], 5);
  assert_int_equal(t.dims[2], 7);
  assert_int_equal(t.numel, 105);
  assert_memory_equal(t.data, a, sizeof a);
  sbn_npy_free(&t);
  assert_null(t.data);

  /* Overwriting an existing file replaces it, and leaves no temporary. */
  size_t d1[1] = {2};
  assert_int_equal(sbn_npy_write(p, a, 1, d1), 0);
  assert_int_equal(sbn_npy_read(p, &t), 0);
  assert_int_equal(t.ndim, 1);
  assert_int_equal(t.dims[0], 2);
  assert_memory_equal(t.data, a, 2 * sizeof(float));
  sbn_npy_free(&t);
  char cmd[256];
  snprintf(cmd, sizeof cmd, "ls '%s' | grep -q tmp", g_dir);
  assert_int_not_equal(system(cmd), 0);
}

static void test_scalar_and_empty(void **state) {
  (void)state;
  float v = 2.5f;
  sbn_npy_t t;
  const char *p = tpath("scalar.npy");
  assert_int_equal(sbn_npy_write(p, &v, 0, NULL), 0);
  assert_int_equal(sbn_npy_read(p, &t), 0);
  assert_int_equal(t.ndim, 0);
  assert_int_equal(t.numel, 1);
  assert_true(t.data[0] == 2.5f);
  sbn_npy_free(&t);

  size_t dims[2] = {0, 4};
  p = tpath("empty.npy");
  assert_int_equal(sbn_npy_write(p, NULL, 2, dims), 0);
  assert_int_equal(sbn_npy_read(p, &t), 0);
  assert_int_equal(t.ndim, 2);
  assert_int_equal(t.dims[0], 0);
  assert_int_equal(t.dims[1], 4);
  assert_int_equal(t.numel, 0);
  assert_non_null(t.data);
  sbn_npy_free(&t);
}

static void test_f8_and_versions(void **state) {
  (void)state;
  double d[6] = {1.0, -2.5, 1e-3, 3.0000001, 1e30, -0.0};
  const char *p = tpath("f8.npy");
  write_raw(p, 1, "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }",
            d, sizeof d);
  sbn_npy_t t;
  assert_int_equal(sbn_npy_read(p, &t), 0);
  assert_int_equal(t.ndim, 2);
  assert_int_equal(t.dims[0], 2);
  assert_int_equal(t.dims[1], 3);
  for (int i = 0; i < 6; i++)
    assert_true(t.data[i] == (float)d[i]);
  sbn_npy_free(&t);

  /* Version 2.0 and 3.0 headers, keys in another order, double quotes. */
  float f[3] = {1, 2, 3};
  p = tpath("v2.npy");
  write_raw(p, 2,
            "{\"shape\": (3,), \"fortran_order\": False, \"descr\": "
            "\"<f4\"}",
            f, sizeof f);
  assert_int_equal(sbn_npy_read(p, &t), 0);
  assert_int_equal(t.ndim, 1);
  assert_int_equal(t.dims[0], 3);
  assert_memory_equal(t.data, f, sizeof f);
  sbn_npy_free(&t);
  p = tpath("v3.npy");
  write_raw(p, 3, "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 3)}",
            f, sizeof f);
  assert_int_equal(sbn_npy_read(p, &t), 0);
  assert_int_equal(t.ndim, 2);
  sbn_npy_free(&t);
}

static void test_malformed(void **state) {
  (void)state;
  float f[12] = {0};
  const char *p;

  p = tpath("nonexistent.npy");
  expect_refused(p, SBN_EIO, "No such file");

  p = tpath("magic.npy");
  FILE *fp = fopen(p, "wb");
  fwrite("\x93NUMPZ\x01\x00\x06\x00{}   \n", 1, 16, fp);
  fclose(fp);
  expect_refused(p, SBN_EFORMAT, "magic");

  p = tpath("short.npy");
  fp = fopen(p, "wb");
  fputs("\x93NU", fp);
  fclose(fp);
  expect_refused(p, SBN_EFORMAT, "magic");

  p = tpath("version.npy");
  write_raw(p, 4, "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }",
            f, 12);
  expect_refused(p, SBN_EFORMAT, "version");

  p = tpath("fortran.npy");
  write_raw(p, 1, "{'descr': '<f4', 'fortran_order': True, 'shape': (3, 4), }",
            f, 48);
  expect_refused(p, SBN_EFORMAT, "Fortran");

  p = tpath("i4.npy");
  write_raw(p, 1, "{'descr': '<i4', 'fortran_order': False, 'shape': (3, 4), }",
            f, 48);
  expect_refused(p, SBN_EFORMAT, "'<i4'");

  p = tpath("be.npy");
  write_raw(p, 1, "{'descr': '>f4', 'fortran_order': False, 'shape': (3, 4), }",
            f, 48);
  expect_refused(p, SBN_EFORMAT, "big-endian");

  p = tpath("truncated.npy");
  write_raw(p, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }",
            f, 47);
  expect_refused(p, SBN_EFORMAT,
                 "declares 48 data bytes but the file holds 47");

  p = tpath("more.npy");
  write_raw(p, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 4), }",
            f, 48);
  expect_refused(p, SBN_EFORMAT,
                 "declares 32 data bytes but the file holds 48");

  p = tpath("overflow.npy");
  write_raw(p, 1,
            "{'descr': '<f4', 'fortran_order': False, "
            "'shape': (4294967296, 4294967296, 2), }",
            f, 48);
  expect_refused(p, SBN_EFORMAT, "overflows");

  p = tpath("bigdim.npy");
  write_raw(p, 1,
            "{'descr': '<f4', 'fortran_order': False, "
            "'shape': (99999999999999999999999,), }",
            f, 48);
  expect_refused(p, SBN_EFORMAT, "overflows");

  p = tpath("ndim.npy");
  write_raw(p, 1,
            "{'descr': '<f4', 'fortran_order': False, "
            "'shape': (1, 1, 1, 1, 1, 1, 1, 1, 3), }",
            f, 12);
  expect_refused(p, SBN_EFORMAT, "more than 8 dims");

  p = tpath("nokey.npy");
  write_raw(p, 1, "{'descr': '<f4', 'shape': (3,), }", f, 12);
  expect_refused(p, SBN_EFORMAT, "fortran_order");

  p = tpath("dupkey.npy");
  write_raw(p, 1,
            "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, "
            "'shape': (3,), }",
            f, 12);
  expect_refused(p, SBN_EFORMAT, "twice");

  p = tpath("unknownkey.npy");
  write_raw(p, 1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), "
            "'x': 1}",
            f, 12);
  expect_refused(p, SBN_EFORMAT, "unknown key");

  p = tpath("notuple.npy");
  write_raw(p, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (3), }", f,
            12);
  expect_refused(p, SBN_EFORMAT, "not a tuple");

  p = tpath("negdim.npy");
  write_raw(p, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (-3,), }",
            f, 12);
  expect_refused(p, SBN_EFORMAT, "shape");

  p = tpath("trailing.npy");
  write_raw(p, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), } x",
            f, 12);
  expect_refused(p, SBN_EFORMAT, "after the dict");

  /* A header whose declared length runs past the end of the file. */
  p = tpath("hdrlen.npy");
  fp = fopen(p, "wb");
  fwrite("\x93NUMPY\x01\x00\xff\x7f{'descr'", 1, 17, fp);
  fclose(fp);
  expect_refused(p, SBN_EFORMAT, "truncated .npy header");

  p = g_dir;
  expect_refused(p, SBN_EIO, "not a regular file");
}

/* A FIFO (no writer) is refused at once as not a regular file; a blocking
 * open would wait for a writer for ever, which the alarm turns into a
 * failure of this test. The same holds for a checkpoint. */
static void test_fifo(void **state) {
  (void)state;
  const char *p = tpath("fifo.npy");
  sbn_ckpt_t *ck = NULL;
  assert_int_equal(mkfifo(p, 0600), 0);
  alarm(10);
  expect_refused(p, SBN_EIO, "not a regular file");
  assert_int_equal(sbn_ckpt_load(p, &ck), SBN_EIO);
  assert_non_null(strstr(sbn_last_error(), "not a regular file"));
  assert_null(ck);
  alarm(0);
  unlink(p);
}

/* sbn_npy_write_tmp leaves the target alone and a complete file under the
 * temporary name, which reads back. */
static void test_write_tmp(void **state) {
  (void)state;
  float f[3] = {1, 2, 3};
  size_t dims[1] = {3};
  char *tmp = NULL;
  sbn_npy_t t;
  const char *p = tpath("staged.npy");
  assert_int_equal(sbn_npy_write_tmp(p, f, 1, dims, &tmp), 0);
  assert_non_null(tmp);
  assert_non_null(strstr(tmp, "/.sbntmp-"));
  assert_int_equal(access(p, F_OK), -1);
  assert_int_equal(sbn_npy_read(tmp, &t), 0);
  assert_int_equal(t.numel, 3);
  assert_true(t.data[2] == 3.0f);
  sbn_npy_free(&t);
  assert_int_equal(unlink(tmp), 0);
  free(tmp);
  assert_int_equal(sbn_npy_write_tmp(p, f, 1, dims, NULL), SBN_EINVAL);
}

static void test_write_errors(void **state) {
  (void)state;
  float f[2] = {1, 2};
  size_t dims[1] = {2};
  const char *p = tpath("nodir/x.npy");
  clear_error();
  assert_int_equal(sbn_npy_write(p, f, 1, dims), SBN_EIO);
  assert_non_null(strstr(sbn_last_error(), p));
  p = tpath("bad.npy");
  assert_int_equal(sbn_npy_write(p, f, SBN_MAX_DIMS + 1, dims), SBN_EINVAL);
  assert_int_equal(sbn_npy_write(p, NULL, 1, dims), SBN_EINVAL);
  size_t huge[2] = {SIZE_MAX / 2, 3};
  assert_int_equal(sbn_npy_write(p, f, 2, huge), SBN_EOVERFLOW);
  assert_int_equal(access(p, F_OK), -1);
  sbn_npy_t t;
  assert_int_equal(sbn_npy_read(NULL, &t), SBN_EINVAL);
  assert_int_equal(sbn_npy_read(p, NULL), SBN_EINVAL);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_round_trip),
      cmocka_unit_test(test_scalar_and_empty),
      cmocka_unit_test(test_f8_and_versions),
      cmocka_unit_test(test_malformed),
      cmocka_unit_test(test_write_errors),
      cmocka_unit_test(test_fifo),
      cmocka_unit_test(test_write_tmp),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
