/* sockaddr.c: socket addresses between Python and C, as the socket module
 * converts them: sockaddr -> Python address (make_sockaddr), Python
 * address -> sockaddr (parse_sockaddr, with host names resolved), and the
 * address family of a socket (get_family).
 */
#include "binding.h"

#include <string.h>

#ifdef _WIN32
# include <ws2tcpip.h>
#else
# include <arpa/inet.h>
# include <netdb.h>
# include <netinet/in.h>
# include <sys/un.h>
#endif

/* ======================================================================
 * Socket addresses
 * ====================================================================== */

/* Raises the error of the last failed socket call. */
static PyObject* set_socket_error(void) {
#ifdef _WIN32
  return PyErr_SetExcFromWindowsErr(PyExc_OSError, WSAGetLastError());
#else
  return PyErr_SetFromErrno(PyExc_OSError);
#endif
}

/* Python address from a sockaddr, in the socket module's shapes. */
PyObject* fb_make_sockaddr(const struct sockaddr_storage* ss,
                           fiocp_socklen_t len) {
  char host[INET6_ADDRSTRLEN];
  if (len <= 0) Py_RETURN_NONE;
  switch (ss->ss_family) {
    case AF_INET: {
      const struct sockaddr_in* a = (const struct sockaddr_in*)ss;
      if (inet_ntop(AF_INET, (void*)&a->sin_addr, host, sizeof(host)) == NULL)
        return set_socket_error();
      return Py_BuildValue("(si)", host, (int)ntohs(a->sin_port));
    }
    case AF_INET6: {
      const struct sockaddr_in6* a = (const struct sockaddr_in6*)ss;
      if (inet_ntop(AF_INET6, (void*)&a->sin6_addr, host, sizeof(host)) == NULL)
        return set_socket_error();
      return Py_BuildValue("(siII)", host, (int)ntohs(a->sin6_port),
                           (unsigned)ntohl(a->sin6_flowinfo),
                           (unsigned)a->sin6_scope_id);
    }
#ifndef _WIN32
    case AF_UNIX: {
      const struct sockaddr_un* a = (const struct sockaddr_un*)ss;
      size_t plen = (size_t)len - offsetof(struct sockaddr_un, sun_path);
      if ((size_t)len <= offsetof(struct sockaddr_un, sun_path))
        return PyUnicode_FromString("");
      if (a->sun_path[0] == 0) /* Linux abstract namespace: bytes */
        return PyBytes_FromStringAndSize(a->sun_path, (Py_ssize_t)plen);
      plen = strnlen(a->sun_path, plen);
      return PyUnicode_DecodeFSDefaultAndSize(a->sun_path, (Py_ssize_t)plen);
    }
#endif
    default:
      return Py_BuildValue("(iy#)", (int)ss->ss_family, (const char*)ss,
                           (Py_ssize_t)len);
  }
}

/* PyArg "O&" converter of a host name, as the socket module takes one: a
 * str (ASCII as is, other text IDNA-encoded), bytes or bytearray, without
 * NUL characters. Stores a new bytes object. */
static int host_converter(PyObject* obj, void* out) {
  PyObject* b;
  if (PyUnicode_Check(obj)) {
    b = PyUnicode_IS_ASCII(obj) ? PyUnicode_AsUTF8String(obj)
                                : PyUnicode_AsEncodedString(obj, "idna", NULL);
  } else if (PyBytes_Check(obj) || PyByteArray_Check(obj)) {
    b = PyBytes_FromObject(obj);
  } else {
    PyErr_Format(PyExc_TypeError, "str, bytes or bytearray expected, not %s",
                 Py_TYPE(obj)->tp_name);
    return 0;
  }
  if (b == NULL) return 0;
  if (strlen(PyBytes_AS_STRING(b)) != (size_t)PyBytes_GET_SIZE(b)) {
    PyErr_SetString(PyExc_TypeError, "host name must not contain null character");
    Py_DECREF(b);
    return 0;
  }
  *(PyObject**)out = b;
  return 1;
}

/* Resolves host for family into out as the socket module does: "" is the
 * wildcard address, "<broadcast>" (IPv4) the broadcast address, numeric
 * addresses are parsed, other names go to the resolver (with the GIL
 * released: it may block on DNS). */
static int resolve_host(const char* host, int family, void* out) {
  struct addrinfo hints, *res = NULL;
  int rc;
  if (host[0] == 0) {
    if (family == AF_INET) memset(out, 0, sizeof(struct in_addr));
    else memset(out, 0, sizeof(struct in6_addr));
    return 0;
  }
  if (strcmp(host, "<broadcast>") == 0) {
    if (family != AF_INET) {
      PyErr_SetString(PyExc_OSError, "address family mismatched");
      return -1;
    }
    ((struct in_addr*)out)->s_addr = htonl(INADDR_BROADCAST);
    return 0;
  }
  if (inet_pton(family, host, out) == 1) return 0;
  memset(&hints, 0, sizeof(hints));
  hints.ai_family = family;
  Py_BEGIN_ALLOW_THREADS
  rc = getaddrinfo(host, NULL, &hints, &res);
  Py_END_ALLOW_THREADS
  if (rc != 0 || res == NULL) {
    PyErr_Format(PyExc_OSError, "cannot resolve host '%s': %s", host,
                 gai_strerror(rc));
    if (res) freeaddrinfo(res);
    return -1;
  }
  if (family == AF_INET)
    memcpy(out, &((struct sockaddr_in*)res->ai_addr)->sin_addr,
           sizeof(struct in_addr));
  else
    memcpy(out, &((struct sockaddr_in6*)res->ai_addr)->sin6_addr,
           sizeof(struct in6_addr));
  freeaddrinfo(res);
  return 0;
}

/* Parses a Python address for family into a sockaddr, accepting and
 * refusing exactly what the socket module's caller() (sendto, connect)
 * would, with the same exception types. */
int fb_parse_sockaddr(const char* caller, PyObject* addr, int family,
                      struct sockaddr_storage* ss, fiocp_socklen_t* len) {
  memset(ss, 0, sizeof(*ss));
  switch (family) {
    case AF_INET:
    case AF_INET6: {
      PyObject* host = NULL;
      int port, rc;
      unsigned int flowinfo = 0, scope_id = 0;
      if (!PyTuple_Check(addr)) {
        PyErr_Format(PyExc_TypeError, "%s(): %s address must be tuple, not %.500s",
                     caller, family == AF_INET ? "AF_INET" : "AF_INET6",
                     Py_TYPE(addr)->tp_name);
        return -1;
      }
      /* flowinfo and scope_id as the socket module reads them ('I': a
       * C unsigned int taken modulo 2**32), then range-checked. */
      rc = family == AF_INET
               ? PyArg_ParseTuple(addr, "O&i;AF_INET address must be a pair (host, port)",
                                  host_converter, &host, &port)
               : PyArg_ParseTuple(addr,
                                  "O&i|II;AF_INET6 address must be a tuple (host, "
                                  "port[, flowinfo[, scopeid]])",
                                  host_converter, &host, &port, &flowinfo,
                                  &scope_id);
      if (!rc) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError))
          PyErr_Format(PyExc_OverflowError, "%s(): port must be 0-65535.", caller);
        return -1;
      }
      if (port < 0 || port > 0xffff) {
        PyErr_Format(PyExc_OverflowError, "%s(): port must be 0-65535.", caller);
        Py_DECREF(host);
        return -1;
      }
      if (flowinfo > 0xfffff) {
        PyErr_Format(PyExc_OverflowError, "%s(): flowinfo must be 0-1048575.",
                     caller);
        Py_DECREF(host);
        return -1;
      }
      if (family == AF_INET) {
        struct sockaddr_in* a = (struct sockaddr_in*)ss;
        a->sin_family = AF_INET;
        a->sin_port = htons((unsigned short)port);
        rc = resolve_host(PyBytes_AS_STRING(host), AF_INET, &a->sin_addr);
        *len = (fiocp_socklen_t)sizeof(*a);
      } else {
        struct sockaddr_in6* a = (struct sockaddr_in6*)ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((unsigned short)port);
        a->sin6_flowinfo = htonl(flowinfo);
        a->sin6_scope_id = scope_id;
        rc = resolve_host(PyBytes_AS_STRING(host), AF_INET6, &a->sin6_addr);
        *len = (fiocp_socklen_t)sizeof(*a);
      }
      Py_DECREF(host);
      return rc;
    }
#ifndef _WIN32
    case AF_UNIX: {
      struct sockaddr_un* a = (struct sockaddr_un*)ss;
      PyObject* path = NULL;
      char* p;
      Py_ssize_t plen;
      if (PyUnicode_Check(addr)) {
        path = PyUnicode_EncodeFSDefault(addr);
      } else if (PyBytes_Check(addr) || PyByteArray_Check(addr)) {
        path = PyBytes_FromObject(addr);
      } else {
        PyObject* fs = PyOS_FSPath(addr);
        if (fs == NULL) {
          if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError,
                         "%s(): AF_UNIX address must be str, bytes or a "
                         "path, not %.100s",
                         caller, Py_TYPE(addr)->tp_name);
          }
          return -1;
        }
        if (PyUnicode_Check(fs)) {
          path = PyUnicode_EncodeFSDefault(fs);
          Py_DECREF(fs);
        } else {
          path = fs;
        }
      }
      if (path == NULL) return -1;
      p = PyBytes_AS_STRING(path);
      plen = PyBytes_GET_SIZE(path);
      if ((size_t)plen >= sizeof(a->sun_path)) {
        Py_DECREF(path);
        PyErr_SetString(PyExc_OSError, "AF_UNIX path too long");
        return -1;
      }
      a->sun_family = AF_UNIX;
      memcpy(a->sun_path, p, (size_t)plen);
      *len = (fiocp_socklen_t)(offsetof(struct sockaddr_un, sun_path) +
                               (size_t)plen + (plen > 0 && p[0] != 0 ? 1 : 0));
      Py_DECREF(path);
      return 0;
    }
#endif
    default:
      PyErr_Format(PyExc_ValueError, "unsupported address family %d", family);
      return -1;
  }
}

/* The address family of a socket object (its `family`) or, for a bare
 * handle, of the socket it names. Returns it, or -1 with an exception. */
int fb_get_family(PyObject* sockobj, fiocp_handle_t h) {
  PyObject* fam = PyObject_GetAttrString(sockobj, "family");
  if (fam != NULL) {
    long v = PyLong_AsLong(fam);
    Py_DECREF(fam);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (v < 0 || v > 0xffff) { /* sa_family_t is 16 bits */
      PyErr_Format(PyExc_ValueError, "invalid address family %ld", v);
      return -1;
    }
    return (int)v;
  }
  if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return -1;
  PyErr_Clear();
  {
#ifdef _WIN32
    WSAPROTOCOL_INFOW info;
    int ilen = (int)sizeof(info);
    if (getsockopt((SOCKET)h, SOL_SOCKET, SO_PROTOCOL_INFOW, (char*)&info,
                   &ilen) == 0)
      return info.iAddressFamily;
    PyErr_SetExcFromWindowsErr(PyExc_OSError, WSAGetLastError());
    return -1;
#else
    struct sockaddr_storage ss;
    socklen_t len = (socklen_t)sizeof(ss);
    memset(&ss, 0, sizeof(ss));
    if (getsockname((int)h, (struct sockaddr*)&ss, &len) < 0) {
      PyErr_SetFromErrno(PyExc_OSError);
      return -1;
    }
    return ss.ss_family;
#endif
  }
}
