/* Internals shared by the server's files (not installed). */
#ifndef SBN_SVC_SERVER_INT_H
#define SBN_SVC_SERVER_INT_H

/* Removes the socket file at path if nobody answers on it (a worker that
 * died without removing it); a live socket or any other file is refused
 * with BAD_PARAMS. Returns 0 when path is free to bind. */
int svc__socket_clear_stale(const char *path);

#endif /* SBN_SVC_SERVER_INT_H */
