/* `syncbn train`: the per-epoch results as JSON and CSV (rank 0). */
#include <stdio.h>

#include "cli_train_int.h"

static int closed(FILE *f, const char *path) {
  int bad = ferror(f);
  if (fclose(f) != 0 || bad)
    return sbn_set_error(SBN_EIO, "%s: write failed", path);
  return 0;
}

int sbn__train_write_json(const char *path, const train_opts_t *o,
                          const train_epoch_t *ep, size_t n) {
  FILE *f = fopen(path, "w");
  if (f == NULL)
    return sbn_set_error(SBN_EIO, "%s: cannot create", path);
  fprintf(f,
          "{\n  \"model\": \"%s\",\n  \"norm\": \"%s\",\n  \"seed\": "
          "%llu,\n  \"epochs\": [\n",
          o->arch == SBN_NN_CNN ? "cnn" : "mlp", sbn__train_norm_name(o->norm),
          (unsigned long long)o->seed);
  for (size_t i = 0; i < n; i++)
    fprintf(f,
            "    {\"epoch\": %zu, \"train_loss\": %.9g, \"test_loss\": "
            "%.9g, \"test_accuracy\": %.9g, \"wall_s\": %.6f, "
            "\"allreduce_share\": %.6f}%s\n",
            i + 1, ep[i].train_loss, ep[i].test_loss, ep[i].test_acc,
            ep[i].wall_s, ep[i].allreduce_share, i + 1 < n ? "," : "");
  fprintf(f, "  ]\n}\n");
  return closed(f, path);
}

int sbn__train_write_csv(const char *path, const train_epoch_t *ep, size_t n) {
  FILE *f = fopen(path, "w");
  if (f == NULL)
    return sbn_set_error(SBN_EIO, "%s: cannot create", path);
  fprintf(f,
          "epoch,train_loss,test_loss,test_accuracy,wall_s,"
          "allreduce_share\n");
  for (size_t i = 0; i < n; i++)
    fprintf(f, "%zu,%.9g,%.9g,%.9g,%.6f,%.6f\n", i + 1, ep[i].train_loss,
            ep[i].test_loss, ep[i].test_acc, ep[i].wall_s,
            ep[i].allreduce_share);
  return closed(f, path);
}
