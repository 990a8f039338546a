/* message.c: what sendmsg() and recvmsg() hand the kernel besides one
 * buffer: a vector of pinned buffers, and the ancillary data (control
 * messages such as SCM_RIGHTS), packed and parsed as the socket module's
 * sendmsg()/recvmsg() do.
 */
#include "binding.h"

#include <string.h>

/* Largest I/O vector (IOV_MAX on Linux, and more WSABUFs than any sane
 * WSASend takes) and one operation's total: what one system call moves. */
#define MAX_BUFFERS 1024
#define MAX_TOTAL 0x7ffff000
/* Room for received ancillary data: SCM_RIGHTS of 253 descriptors (the
 * kernel's limit) is about 1 KiB; this leaves plenty. */
#define MAX_ANCBUFSIZE (1 << 20)

void fb_msgbufs_free(fb_msgbufs_t* m) {
  Py_ssize_t i;
  if (m == NULL) return;
  for (i = 0; i < m->nviews; i++) PyBuffer_Release(&m->views[i]);
  PyMem_Free(m->iovs);
  PyMem_Free(m->control);
  PyMem_Free(m);
}

fb_msgbufs_t* fb_msgbufs_pin(const char* fname, PyObject* buffers,
                             int writable, PyObject** seq_out) {
  PyObject* seq;
  Py_ssize_t n, i, total = 0;
  fb_msgbufs_t* m;
  if (PyObject_CheckBuffer(buffers) || PyUnicode_Check(buffers)) {
    PyErr_Format(PyExc_TypeError,
                 "%s() takes a sequence of buffers, not one %.100s (wrap it "
                 "in a list)", fname, Py_TYPE(buffers)->tp_name);
    return NULL;
  }
  seq = PySequence_Tuple(buffers);
  if (seq == NULL) {
    if (PyErr_ExceptionMatches(PyExc_TypeError)) {
      PyErr_Clear();
      PyErr_Format(PyExc_TypeError,
                   "%s() buffers must be an iterable of buffers, not %.100s",
                   fname, Py_TYPE(buffers)->tp_name);
    }
    return NULL;
  }
  n = PyTuple_GET_SIZE(seq);
  if (n > MAX_BUFFERS) {
    PyErr_Format(PyExc_ValueError, "%s() takes at most %d buffers, not %zd",
                 fname, MAX_BUFFERS, n);
    Py_DECREF(seq);
    return NULL;
  }
  m = (fb_msgbufs_t*)PyMem_Calloc(
      1, offsetof(fb_msgbufs_t, views) + (size_t)(n > 0 ? n : 1) * sizeof(Py_buffer));
#ifdef _WIN32
  if (m != NULL) m->iovs = PyMem_Calloc((size_t)(n > 0 ? n : 1), sizeof(WSABUF));
#else
  if (m != NULL) m->iovs = PyMem_Calloc((size_t)(n > 0 ? n : 1), sizeof(struct iovec));
#endif
  if (m == NULL || m->iovs == NULL) {
    fb_msgbufs_free(m);
    Py_DECREF(seq);
    PyErr_NoMemory();
    return NULL;
  }
  for (i = 0; i < n; i++) {
    PyObject* item = PyTuple_GET_ITEM(seq, i);
    Py_buffer* v = &m->views[i];
    /* An exporter may run Python code: nothing is submitted yet. */
    if (PyObject_GetBuffer(item, v, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
      if (PyErr_ExceptionMatches(PyExc_BufferError) ||
          PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError,
                     "%s() buffers[%zd] must be a %scontiguous buffer, not "
                     "%.100s", fname, i, writable ? "writable, " : "",
                     Py_TYPE(item)->tp_name);
      }
      goto fail;
    }
    m->nviews = i + 1;
    if (v->len > MAX_TOTAL - total) {
      PyErr_Format(PyExc_ValueError,
                   "%s() moves at most %d bytes in one operation", fname,
                   MAX_TOTAL);
      goto fail;
    }
    total += v->len;
#ifdef _WIN32
    ((WSABUF*)m->iovs)[i].buf = (char*)v->buf;
    ((WSABUF*)m->iovs)[i].len = (ULONG)v->len;
#else
    ((struct iovec*)m->iovs)[i].iov_base = v->buf;
    ((struct iovec*)m->iovs)[i].iov_len = (size_t)v->len;
#endif
  }
  *seq_out = seq;
  return m;
fail:
  fb_msgbufs_free(m);
  Py_DECREF(seq);
  return NULL;
}

int fb_msgbufs_alloc_control(fb_msgbufs_t* m, Py_ssize_t size) {
  if (size < 0 || size > MAX_ANCBUFSIZE) {
    PyErr_Format(PyExc_ValueError, "ancbufsize must be between 0 and %d",
                 MAX_ANCBUFSIZE);
    return -1;
  }
  if (size == 0) return 0;
#ifdef _WIN32
  PyErr_SetString(PyExc_NotImplementedError,
                  "recvmsg(): ancillary data is not supported on Windows "
                  "(ancbufsize must be 0)");
  return -1;
#else
  m->control = (char*)PyMem_Calloc(1, (size_t)size);
  if (m->control == NULL) {
    PyErr_NoMemory();
    return -1;
  }
  m->controllen = size;
  return 0;
#endif
}

typedef struct {
  int level, type;
  Py_buffer data;
} anc_item_t;

#ifdef _WIN32
# define FB_CMSG_SPACE(n) ((n) + 32) /* only for the size check */
#else
# define FB_CMSG_SPACE(n) CMSG_SPACE(n)
#endif

int fb_msgbufs_pack_ancdata(fb_msgbufs_t* m, PyObject* ancdata) {
  PyObject* seq = PySequence_Tuple(ancdata);
  Py_ssize_t n, i;
  if (seq == NULL) {
    if (PyErr_ExceptionMatches(PyExc_TypeError)) {
      PyErr_Clear();
      PyErr_Format(PyExc_TypeError,
                   "ancdata must be an iterable of (level, type, data), not "
                   "%.100s", Py_TYPE(ancdata)->tp_name);
    }
    return -1;
  }
  n = PyTuple_GET_SIZE(seq);
  if (n == 0) {
    Py_DECREF(seq);
    return 0;
  }
  {
    anc_item_t* items = (anc_item_t*)PyMem_Calloc((size_t)n, sizeof(anc_item_t));
    Py_ssize_t parsed = 0, space = 0;
    int rc = -1;
#ifndef _WIN32
    struct msghdr mh;
    struct cmsghdr* cm;
#endif
    if (items == NULL) {
      PyErr_NoMemory();
      goto done;
    }
    for (i = 0; i < n; i++) {
      PyObject* item = PyTuple_GET_ITEM(seq, i);
      if (!PyTuple_Check(item) ||
          !PyArg_ParseTuple(item, "iiy*;ancdata items must be (level, type, data)",
                            &items[i].level, &items[i].type, &items[i].data)) {
        if (!PyErr_Occurred())
          PyErr_Format(PyExc_TypeError,
                       "ancdata items must be (level, type, data) tuples, not "
                       "%.100s", Py_TYPE(item)->tp_name);
        goto done;
      }
      parsed = i + 1;
      if ((size_t)items[i].data.len > (size_t)MAX_ANCBUFSIZE ||
          space + (Py_ssize_t)FB_CMSG_SPACE((size_t)items[i].data.len) > MAX_ANCBUFSIZE) {
        PyErr_SetString(PyExc_OSError, "ancillary data too large");
        goto done;
      }
      space += (Py_ssize_t)FB_CMSG_SPACE((size_t)items[i].data.len);
    }
#ifdef _WIN32
    /* The items are checked as everywhere; Windows then refuses them. */
    (void)m;
    PyErr_SetString(PyExc_NotImplementedError,
                    "sendmsg(): ancillary data is not supported on Windows");
    goto done;
#else
    m->control = (char*)PyMem_Calloc(1, (size_t)space);
    if (m->control == NULL) {
      PyErr_NoMemory();
      goto done;
    }
    m->controllen = space;
    memset(&mh, 0, sizeof(mh));
    mh.msg_control = m->control;
    mh.msg_controllen = (size_t)space;
    cm = CMSG_FIRSTHDR(&mh);
    for (i = 0; i < n && cm != NULL; i++) {
      cm->cmsg_level = items[i].level;
      cm->cmsg_type = items[i].type;
      cm->cmsg_len = CMSG_LEN((size_t)items[i].data.len);
      memcpy(CMSG_DATA(cm), items[i].data.buf, (size_t)items[i].data.len);
      cm = CMSG_NXTHDR(&mh, cm);
    }
    rc = 0;
#endif
  done:
    for (i = 0; i < parsed; i++) PyBuffer_Release(&items[i].data);
    PyMem_Free(items);
    Py_DECREF(seq);
    return rc;
  }
}

PyObject* fb_parse_ancdata(const char* control, size_t len) {
  PyObject* list = PyList_New(0);
#ifndef _WIN32
  struct msghdr mh;
  struct cmsghdr* cm;
  if (list == NULL || control == NULL || len == 0) return list;
  memset(&mh, 0, sizeof(mh));
  mh.msg_control = (void*)control;
  mh.msg_controllen = len;
  for (cm = CMSG_FIRSTHDR(&mh); cm != NULL; cm = CMSG_NXTHDR(&mh, cm)) {
    /* The last header may be cut short by MSG_CTRUNC: keep what is in the
     * buffer, as the socket module does. */
    size_t off = (size_t)((const char*)CMSG_DATA(cm) - control);
    size_t dlen = cm->cmsg_len > CMSG_LEN(0) ? cm->cmsg_len - CMSG_LEN(0) : 0;
    PyObject* item;
    if (off > len) break;
    if (dlen > len - off) dlen = len - off;
    item = Py_BuildValue("(iiy#)", cm->cmsg_level, cm->cmsg_type,
                         (const char*)CMSG_DATA(cm), (Py_ssize_t)dlen);
    if (item == NULL || PyList_Append(list, item) < 0) {
      Py_XDECREF(item);
      Py_DECREF(list);
      return NULL;
    }
    Py_DECREF(item);
  }
#else
  (void)control;
  (void)len;
#endif
  return list;
}
