/* core.c: the asyncio loop's scheduling in C (issue 16): _LoopCore, the
 * first base of fastiocp.EventLoop (src/fastiocp/loop/_loop.py).
 *
 * The stdlib's BaseEventLoop keeps its scheduling in Python: call_soon()
 * makes an events.Handle through its Python __init__, call_at() pushes an
 * events.TimerHandle on a heap that compares with TimerHandle.__lt__ (a
 * Python call per comparison), and _run_once() is a Python loop that runs
 * each handle through Handle._run(). uvloop does all of this in C. So does
 * _LoopCore, without changing what a program sees:
 *
 * - The loop's state the stdlib reads and writes as attributes (_ready,
 *   _scheduled, _stopping, _debug, _closed, _selector,
 *   _timer_cancelled_count, _clock_resolution) are members of this type,
 *   so the stdlib's Python code and this file share them. _ready stays a
 *   collections.deque and _scheduled a list kept as a heap on _when, with
 *   the very algorithm of heapq, so Python code that touches them (close(),
 *   the stdlib's call_at in debug mode) keeps working.
 * - Handles are genuine events.Handle and events.TimerHandle objects: this
 *   file fills their __slots__ (offsets read from the classes' member
 *   descriptors at setup), as their __init__ would with debug off.
 * - _run_once() is BaseEventLoop._run_once(): the same steps in the same
 *   order; an exact Handle or TimerHandle runs as Handle._run() would
 *   (Context.run semantics through PyContext_Enter/Exit), and its error goes
 *   to the loop's _report_handle_error(handle, exc), the same report.
 *
 * - The proactor's select() (PortProactor.select, src/fastiocp/loop/
 *   _proactor.py) is here too, and _run_once() calls it without a Python
 *   frame: one get_many(), then each completion finished (a direct
 *   operation's callback called, or an operation's Future resolved) inside
 *   one port batch, so what the callbacks submit takes one system call.
 *
 * In debug mode (slow-callback warnings, source tracebacks, thread checks)
 * every method calls the stdlib's own, as does everything if setup found
 * the stdlib's classes shaped differently than expected.
 *
 * One loop per thread, as asyncio's: only call_soon_threadsafe() (Python,
 * through _call_soon, which this file does not replace) comes from other
 * threads, and a deque's append is atomic. Handle slots are read with
 * PyMember_GetOne, safe against a cancel() from another thread on 3.13t. */
#include "loop.h"

#include <time.h>

/* The stdlib's constants (asyncio/base_events.py). */
#define MIN_SCHEDULED_TIMER_HANDLES 100
#define MIN_CANCELLED_TIMER_HANDLES_FRACTION 0.5
#define MAXIMUM_SELECT_TIMEOUT (24.0 * 3600.0)

typedef struct {
  PyObject_HEAD
  PyObject* ready;     /* _ready: collections.deque of handles */
  PyObject* scheduled; /* _scheduled: list, a heap of TimerHandles on _when */
  PyObject* stopping;  /* _stopping */
  PyObject* debug;     /* _debug */
  PyObject* closed;    /* _closed */
  PyObject* selector;  /* _selector: the proactor */
  Py_ssize_t timer_cancelled_count;
  double clock_resolution;
} LoopCoreObject;

/* Set once by _loop_core_setup(): the stdlib's classes and methods. */
static PyTypeObject *handle_type, *timer_handle_type;
static PyObject *base_call_soon, *base_call_at, *base_run_once;
/* BaseProactorEventLoop._process_events, which does nothing; asyncio's Future
 * (the C one where _asyncio is built) and the keyword name for its loop. Set
 * by _loop_core_setup() whatever the handles' shape. */
static PyObject *base_process_events, *future_type, *kw_loop;
/* BaseEventLoop.create_task and asyncio's Task, as future_type. */
static PyObject *base_create_task, *task_type;
#ifndef __linux__
#if PY_VERSION_HEX < 0x030D0000
static PyObject* monotonic_fn; /* time.monotonic, where this file has no clock */
#endif
#endif
static PyMemberDef *m_callback, *m_args, *m_cancelled, *m_loop, *m_source_tb, *m_repr, *m_context,
    *m_when, *m_scheduled;
static int ready_to_go; /* setup found what it expected */

static PyObject *str_append, *str_popleft, *str_select, *str_process_events, *str_time,
    *str_run, *str_report_handle_error, *str_context, *str_backlog, *str_port, *str_pending,
    *str_loop, *str_get_many, *str_done, *str_cancel, *str_set_exception, *str_set_result,
    *str_call_exception_handler, *str_task_factory;

/* ---- the clock: time.monotonic() -------------------------------------- */

/* The value time.monotonic() would return now, or -1 with an exception. */
static double monotonic_now(void) {
#if PY_VERSION_HEX >= 0x030D0000
  PyTime_t t;
  if (PyTime_Monotonic(&t) < 0) return -1.0;
  return PyTime_AsSecondsDouble(t);
#elif defined(__linux__)
  /* CPython's own: CLOCK_MONOTONIC in nanoseconds, then seconds as
   * _PyTime_AsSecondsDouble rounds them. */
  struct timespec ts;
  int64_t ns;
  volatile double d;
  if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0) {
    PyErr_SetFromErrno(PyExc_OSError);
    return -1.0;
  }
  ns = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
  if (ns % 1000000000 == 0) {
    d = (double)(ns / 1000000000);
  } else {
    d = (double)ns;
    d /= 1e9;
  }
  return d;
#else
  PyObject* v;
  double d;
  if (monotonic_fn == NULL) {
    PyErr_SetString(PyExc_RuntimeError, "_loop_core_setup() has not run");
    return -1.0;
  }
  v = PyObject_CallNoArgs(monotonic_fn);
  if (v == NULL) return -1.0;
  d = PyFloat_AsDouble(v);
  Py_DECREF(v);
  return d;
#endif
}

/* self.time(), which a subclass or a test may replace. -1 with an
 * exception on error. */
static double loop_time(LoopCoreObject* self) {
  PyObject* v = PyObject_CallMethodNoArgs((PyObject*)self, str_time);
  double d;
  if (v == NULL) return -1.0;
  d = PyFloat_AsDouble(v);
  Py_DECREF(v);
  return d;
}

/* ---- handles --------------------------------------------------------- */

#define SLOT(obj, m) (*(PyObject**)((char*)(obj) + (m)->offset))

/* A new handle of type (Handle or TimerHandle) with its slots filled as
 * Handle.__init__ fills them with debug off. args: a new reference, stolen. */
static PyObject* handle_new(PyTypeObject* type, LoopCoreObject* loop, PyObject* callback,
                            PyObject* args, PyObject* context) {
  PyObject* h = type->tp_alloc(type, 0);
  if (h == NULL) {
    Py_DECREF(args);
    return NULL;
  }
  if (context == NULL || context == Py_None) {
    context = PyContext_CopyCurrent();
    if (context == NULL) {
      Py_DECREF(args);
      Py_DECREF(h);
      return NULL;
    }
  } else {
    Py_INCREF(context);
  }
  /* A fresh object no other thread sees yet: plain stores. */
  SLOT(h, m_context) = context;
  SLOT(h, m_loop) = Py_NewRef((PyObject*)loop);
  SLOT(h, m_callback) = Py_NewRef(callback);
  SLOT(h, m_args) = args;
  SLOT(h, m_cancelled) = Py_NewRef(Py_False);
  SLOT(h, m_repr) = Py_NewRef(Py_None);
  SLOT(h, m_source_tb) = Py_NewRef(Py_None);
  return h;
}

/* The positional arguments after the first skip of a vectorcall, as a tuple. */
static PyObject* args_tuple(PyObject* const* args, Py_ssize_t nargs, Py_ssize_t skip) {
  PyObject* t = PyTuple_New(nargs - skip);
  Py_ssize_t i;
  if (t == NULL) return NULL;
  for (i = skip; i < nargs; i++) PyTuple_SET_ITEM(t, i - skip, Py_NewRef(args[i]));
  return t;
}

/* The context= keyword of a vectorcall (borrowed; NULL if absent), or -1
 * with an exception for any other keyword. */
static int parse_context(const char* fname, PyObject* const* args, Py_ssize_t nargs,
                         PyObject* kwnames, PyObject** context) {
  Py_ssize_t i, nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
  *context = NULL;
  for (i = 0; i < nkw; i++) {
    PyObject* name = PyTuple_GET_ITEM(kwnames, i);
    if (name == str_context ||
        (PyUnicode_Check(name) && PyUnicode_Compare(name, str_context) == 0)) {
      *context = args[nargs + i];
    } else {
      PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%S'", fname, name);
      return -1;
    }
  }
  return 0;
}

/* The stdlib's method (debug mode, or setup failed): base(self, *args,
 * **kw), with args[0] replaced by first if it is not NULL. */
static PyObject* call_base(PyObject* base, PyObject* self, PyObject* first, PyObject* const* args,
                           size_t nargsf, PyObject* kwnames) {
  Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
  Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
  PyObject* stack[16];
  PyObject** all = stack;
  PyObject* res;
  Py_ssize_t i;
  if (nargs + nkw + 1 > 16) {
    all = (PyObject**)PyMem_Malloc(sizeof(PyObject*) * (size_t)(nargs + nkw + 1));
    if (all == NULL) return PyErr_NoMemory();
  }
  all[0] = self;
  for (i = 0; i < nargs + nkw; i++) all[i + 1] = args[i];
  if (first != NULL && nargs > 0) all[1] = first;
  res = PyObject_Vectorcall(base, all, (size_t)(nargs + 1), kwnames);
  if (all != stack) PyMem_Free(all);
  return res;
}

/* Whether the loop takes the C path: setup succeeded and debug is off.
 * -1 with an exception if _debug's truth fails. */
static int fast_path(LoopCoreObject* self) {
  int debug;
  if (!ready_to_go) return 0;
  if (self->debug == NULL || self->debug == Py_False) return self->debug != NULL;
  debug = PyObject_IsTrue(self->debug);
  return debug < 0 ? -1 : !debug;
}

static int check_closed(LoopCoreObject* self) {
  int closed;
  if (self->closed == NULL) {
    PyErr_SetString(PyExc_AttributeError, "'_closed'");
    return -1;
  }
  closed = self->closed == Py_False ? 0 : PyObject_IsTrue(self->closed);
  if (closed > 0) PyErr_SetString(PyExc_RuntimeError, "Event loop is closed");
  return closed ? -1 : 0;
}

static int ready_append(LoopCoreObject* self, PyObject* handle) {
  PyObject* args[2] = {self->ready, handle};
  PyObject* r;
  if (self->ready == NULL) {
    PyErr_SetString(PyExc_AttributeError, "'_ready'");
    return -1;
  }
  r = PyObject_VectorcallMethod(str_append, args, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
  if (r == NULL) return -1;
  Py_DECREF(r);
  return 0;
}

/* ---- the timer heap: heapq's algorithm, comparing _when in C ---------- */

/* handle._when as a double; -1 with an exception (ok = 0) on error. */
static double when_of(PyObject* handle, int* ok) {
  PyObject* w;
  double d;
  if (!PyObject_TypeCheck(handle, timer_handle_type)) {
    PyErr_Format(PyExc_TypeError, "loop._scheduled holds %R, not a TimerHandle", handle);
    *ok = 0;
    return -1.0;
  }
  w = PyMember_GetOne((const char*)handle, m_when);
  if (w == NULL) {
    *ok = 0;
    return -1.0;
  }
  d = PyFloat_CheckExact(w) ? PyFloat_AS_DOUBLE(w) : PyFloat_AsDouble(w);
  Py_DECREF(w);
  *ok = !(d == -1.0 && PyErr_Occurred());
  return d;
}

/* heapq._siftdown(heap, startpos, pos). 0, or -1 with an exception. */
static int heap_sift_down(PyObject* heap, Py_ssize_t startpos, Py_ssize_t pos) {
  PyObject* newitem = PyList_GET_ITEM(heap, pos);
  int ok = 1;
  double neww = when_of(newitem, &ok);
  if (!ok) return -1;
  while (pos > startpos) {
    Py_ssize_t parentpos = (pos - 1) >> 1;
    PyObject* parent = PyList_GET_ITEM(heap, parentpos);
    double pw = when_of(parent, &ok);
    if (!ok) {
      PyList_SET_ITEM(heap, pos, newitem); /* every item in the list once */
      return -1;
    }
    if (neww < pw) {
      PyList_SET_ITEM(heap, pos, parent);
      pos = parentpos;
      continue;
    }
    break;
  }
  PyList_SET_ITEM(heap, pos, newitem);
  return 0;
}

/* heapq._siftup(heap, pos). 0, or -1 with an exception. */
static int heap_sift_up(PyObject* heap, Py_ssize_t pos) {
  Py_ssize_t endpos = PyList_GET_SIZE(heap), startpos = pos, childpos = 2 * pos + 1;
  PyObject* newitem = PyList_GET_ITEM(heap, pos);
  int ok = 1;
  while (childpos < endpos) {
    Py_ssize_t rightpos = childpos + 1;
    if (rightpos < endpos) {
      double cw = when_of(PyList_GET_ITEM(heap, childpos), &ok);
      double rw = ok ? when_of(PyList_GET_ITEM(heap, rightpos), &ok) : 0.0;
      if (!ok) {
        PyList_SET_ITEM(heap, pos, newitem);
        return -1;
      }
      if (!(cw < rw)) childpos = rightpos;
    }
    PyList_SET_ITEM(heap, pos, PyList_GET_ITEM(heap, childpos));
    pos = childpos;
    childpos = 2 * pos + 1;
  }
  PyList_SET_ITEM(heap, pos, newitem);
  return heap_sift_down(heap, startpos, pos);
}

/* heapq.heappush(heap, item). */
static int heap_push(PyObject* heap, PyObject* item) {
  if (PyList_Append(heap, item) < 0) return -1;
  return heap_sift_down(heap, 0, PyList_GET_SIZE(heap) - 1);
}

/* heapq.heappop(heap) (heap not empty): a new reference, or NULL. */
static PyObject* heap_pop(PyObject* heap) {
  Py_ssize_t n = PyList_GET_SIZE(heap);
  PyObject* last = Py_NewRef(PyList_GET_ITEM(heap, n - 1));
  PyObject* first;
  if (PyList_SetSlice(heap, n - 1, n, NULL) < 0) {
    Py_DECREF(last);
    return NULL;
  }
  if (n == 1) return last;
  first = PyList_GET_ITEM(heap, 0); /* the list's reference, now ours */
  PyList_SET_ITEM(heap, 0, last);
  if (heap_sift_up(heap, 0) < 0) {
    /* The heap is whole again (sift_up puts newitem back); first is out. */
    Py_DECREF(first);
    return NULL;
  }
  return first;
}

static int set_scheduled(PyObject* handle, PyObject* value) {
  return PyMember_SetOne((char*)handle, m_scheduled, value);
}

/* Whether a timer of the heap is cancelled: 1, 0, or -1 with an exception
 * (TypeError for anything but a TimerHandle: its slots are read by offset). */
static int timer_cancelled(PyObject* handle) {
  PyObject* c;
  int cancelled;
  if (!PyObject_TypeCheck(handle, timer_handle_type)) {
    PyErr_Format(PyExc_TypeError, "loop._scheduled holds %R, not a TimerHandle", handle);
    return -1;
  }
  c = PyMember_GetOne((const char*)handle, m_cancelled);
  if (c == NULL) return -1;
  cancelled = c == Py_False ? 0 : PyObject_IsTrue(c);
  Py_DECREF(c);
  return cancelled;
}

/* ---- running a handle ------------------------------------------------ */

/* Handle._run()'s except clause for the exception set: the loop's
 * _report_handle_error(handle, exc) (Python) reports it. */
static int report_error(LoopCoreObject* self, PyObject* h) {
  PyObject *exc = fb_take_exception(), *res;
  if (exc == NULL) return 0;
  {
    PyObject* call[3] = {(PyObject*)self, h, exc};
    res = PyObject_VectorcallMethod(str_report_handle_error, call,
                                    3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
  }
  Py_DECREF(exc);
  if (res == NULL) return -1;
  Py_DECREF(res);
  return 0;
}

/* Handle._run() for an exact Handle or TimerHandle, else handle._run().
 * 0, or -1 with SystemExit / KeyboardInterrupt (or a failing report). */
static int handle_run(LoopCoreObject* self, PyObject* h) {
  PyObject *callback = NULL, *args = NULL, *context = NULL, *res = NULL;
  PyTypeObject* type = Py_TYPE(h);
  if (type != handle_type && type != timer_handle_type) {
    res = PyObject_CallMethodNoArgs(h, str_run);
    if (res == NULL) return -1;
    Py_DECREF(res);
    return 0;
  }
  callback = PyMember_GetOne((const char*)h, m_callback);
  args = callback ? PyMember_GetOne((const char*)h, m_args) : NULL;
  context = args ? PyMember_GetOne((const char*)h, m_context) : NULL;
  if (context == NULL) goto failed;
  if (!PyTuple_CheckExact(args) || !PyContext_CheckExact(context)) {
    /* Not what this file made (set by hand): the stdlib's own. */
    Py_DECREF(callback);
    Py_DECREF(args);
    Py_DECREF(context);
    res = PyObject_CallMethodNoArgs(h, str_run);
    if (res == NULL) return -1;
    Py_DECREF(res);
    return 0;
  }
  if (PyContext_Enter(context) == 0) {
    res = PyObject_Vectorcall(callback, &PyTuple_GET_ITEM(args, 0),
                              (size_t)PyTuple_GET_SIZE(args), NULL);
    if (PyContext_Exit(context) < 0) Py_CLEAR(res);
  }
  Py_DECREF(context);
failed:
  Py_XDECREF(callback);
  Py_XDECREF(args);
  if (res != NULL) {
    Py_DECREF(res);
    return 0;
  }
  if (PyErr_ExceptionMatches(PyExc_SystemExit) || PyErr_ExceptionMatches(PyExc_KeyboardInterrupt))
    return -1;
  return report_error(self, h);
}

/* ---- the proactor's select(): PortProactor.select in C ---------------- */

/* Set by _loop_core_setup(): PortProactor (its select is this one) and
 * _proactor._CONTINUED (a finish() that started the rest of the operation). */
static PyTypeObject* proactor_type;
static PyObject* continued;
#define SELECT_BATCH 256

/* fut.name(*args): the result (new reference) or NULL. */
static PyObject* call_method(PyObject* obj, PyObject* name, PyObject* arg) {
  PyObject* call[2] = {obj, arg};
  return PyObject_VectorcallMethod(name, call, (arg ? 2 : 1) | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                   NULL);
}

static int call_method_drop(PyObject* obj, PyObject* name, PyObject* arg) {
  PyObject* r = call_method(obj, name, arg);
  if (r == NULL) return -1;
  Py_DECREF(r);
  return 0;
}

/* One completion of a batch, as the proactor finishes it: a direct
 * operation's callback is called (its error reported to the loop); an
 * operation with a Future, (future, finish) as its context, resolves the
 * future (appended to done). 0, or -1 with an exception to raise:
 * SystemExit / KeyboardInterrupt from a callback, or a Future's error. */
static int finish_one(PyObject* c, PyObject* pending, PyObject* loop, PyObject* done) {
  PyObject *ctx, *fut, *finish, *r, *err;
  int isdone;
  if (!PyObject_TypeCheck(c, &fb_CompletionType)) {
    PyErr_Format(PyExc_TypeError, "not a Completion: %R", c);
    return -1;
  }
  ctx = ((CompletionObject*)c)->context;
  if (ctx == Py_None) return 0; /* a wake-up post (call_soon_threadsafe) */
  if (!PyTuple_CheckExact(ctx)) {
    /* A direct operation (recv_direct): its callback runs now, as the loop
     * would run a ready handle. */
    r = PyObject_CallOneArg(ctx, c);
    if (r != NULL) {
      Py_DECREF(r);
      return 0;
    }
    if (PyErr_ExceptionMatches(PyExc_SystemExit) ||
        PyErr_ExceptionMatches(PyExc_KeyboardInterrupt))
      return -1;
    {
      PyObject* exc = fb_take_exception();
      PyObject* msg = PyUnicode_FromFormat("Exception in callback %R", ctx);
      PyObject* context = msg ? Py_BuildValue("{sOsO}", "message", msg, "exception", exc) : NULL;
      Py_XDECREF(msg);
      Py_XDECREF(exc);
      if (context == NULL) return -1;
      r = call_method(loop, str_call_exception_handler, context);
      Py_DECREF(context);
      if (r == NULL) return -1;
      Py_DECREF(r);
      return 0;
    }
  }
  if (PyDict_DelItem(pending, c) < 0) {
    if (!PyErr_ExceptionMatches(PyExc_KeyError)) return -1;
    PyErr_Clear();
  }
  if (PyTuple_GET_SIZE(ctx) != 2) {
    PyErr_Format(PyExc_TypeError, "an operation's context is not (future, finish): %R", ctx);
    return -1;
  }
  fut = PyTuple_GET_ITEM(ctx, 0);
  finish = PyTuple_GET_ITEM(ctx, 1);
  r = call_method(fut, str_done, NULL);
  if (r == NULL) return -1;
  isdone = PyObject_IsTrue(r);
  Py_DECREF(r);
  if (isdone) return isdone < 0 ? -1 : 0; /* cancelled by the caller */
  err = ((CompletionObject*)c)->error;
  if (err != Py_None) {
    if (((CompletionObject*)c)->cancelled) {
      if (call_method_drop(fut, str_cancel, NULL) < 0) return -1;
    } else if (call_method_drop(fut, str_set_exception, err) < 0) {
      return -1;
    }
  } else {
    PyObject* value = PyObject_CallOneArg(finish, c);
    if (value == NULL) {
      PyObject* exc = fb_take_exception();
      int rc = exc == NULL ? 0 : call_method_drop(fut, str_set_exception, exc);
      Py_XDECREF(exc);
      if (rc < 0) return -1;
    } else {
      int rc = value == continued ? 0 : call_method_drop(fut, str_set_result, value);
      Py_DECREF(value);
      if (rc < 0) return -1;
    }
  }
  return PyList_Append(done, fut);
}

/* Finishes batch[start:]; on SystemExit / KeyboardInterrupt from a
 * callback, what is left of it becomes proactor._backlog, finished by the
 * next select(). The futures finished, or NULL. */
static PyObject* finish_batch(PyObject* proactor, PyObject* batch) {
  PyObject *pending, *loop, *done;
  Py_ssize_t i, n = PyList_GET_SIZE(batch);
  pending = PyObject_GetAttr(proactor, str_pending);
  if (pending == NULL) return NULL;
  if (!PyDict_Check(pending)) {
    PyErr_SetString(PyExc_TypeError, "proactor._pending is not a dict");
    Py_DECREF(pending);
    return NULL;
  }
  loop = PyObject_GetAttr(proactor, str_loop);
  done = loop ? PyList_New(0) : NULL;
  if (done == NULL) goto out;
  for (i = 0; i < n; i++) {
    PyObject* c = Py_NewRef(PyList_GET_ITEM(batch, i));
    int rc = finish_one(c, pending, loop, done);
    Py_DECREF(c);
    if (rc < 0) {
      if (PyErr_ExceptionMatches(PyExc_SystemExit) ||
          PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
        PyObject *type, *value, *tb, *rest;
        PyErr_Fetch(&type, &value, &tb);
        rest = PyList_GetSlice(batch, i + 1, n);
        if (rest == NULL || PyObject_SetAttr(proactor, str_backlog, rest) < 0) PyErr_Clear();
        Py_XDECREF(rest);
        PyErr_Restore(type, value, tb);
      }
      Py_CLEAR(done);
      break;
    }
  }
out:
  Py_DECREF(pending);
  Py_XDECREF(loop);
  return done;
}

/* PortProactor.select(timeout): waits up to timeout seconds (None: until
 * something completes) and finishes what was dequeued (the backlog a
 * KeyboardInterrupt left, first). The submissions the callbacks make reach
 * the kernel in one system call, at the end. The futures finished. */
static PyObject* proactor_select(PyObject* proactor, PyObject* timeout) {
  PyObject *backlog, *port, *batch, *done;
  if (timeout != Py_None) {
    double t = PyFloat_AsDouble(timeout);
    if (t == -1.0 && PyErr_Occurred()) return NULL;
    if (t < 0) timeout = NULL; /* 0 below */
  }
  backlog = PyObject_GetAttr(proactor, str_backlog);
  if (backlog == NULL) return NULL;
  if (PyList_CheckExact(backlog) && PyList_GET_SIZE(backlog) > 0) {
    PyObject* empty = PyList_New(0);
    if (empty == NULL || PyObject_SetAttr(proactor, str_backlog, empty) < 0) {
      Py_XDECREF(empty);
      Py_DECREF(backlog);
      return NULL;
    }
    Py_DECREF(empty);
    done = finish_batch(proactor, backlog);
    Py_DECREF(backlog);
    return done;
  }
  Py_DECREF(backlog);
  port = PyObject_GetAttr(proactor, str_port);
  if (port == NULL) return NULL;
  if (!Py_IS_TYPE(port, &fb_CompletionPortType)) {
    PyErr_SetString(PyExc_TypeError, "proactor._port is not a CompletionPort");
    Py_DECREF(port);
    return NULL;
  }
  {
    PyObject* max = PyLong_FromLong(SELECT_BATCH);
    PyObject* t = timeout == NULL ? PyFloat_FromDouble(0.0) : Py_NewRef(timeout);
    PyObject* call[3] = {port, max, t};
    batch = max && t ? PyObject_VectorcallMethod(str_get_many, call,
                                                 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL)
                     : NULL;
    Py_XDECREF(max);
    Py_XDECREF(t);
  }
  if (batch == NULL) {
    Py_DECREF(port);
    if (!PyErr_ExceptionMatches(fb_PortClosedError)) return NULL;
    PyErr_Clear();
    return PyList_New(0);
  }
  if (!PyList_CheckExact(batch) || PyList_GET_SIZE(batch) == 0) {
    Py_DECREF(port);
    return batch;
  }
  {
    PyObject* r = fb_batch_enter((CompletionPortObject*)port, NULL);
    if (r == NULL) {
      Py_DECREF(port);
      Py_DECREF(batch);
      return NULL;
    }
    Py_DECREF(r);
  }
  done = finish_batch(proactor, batch);
  Py_DECREF(batch);
  {
    /* `with port.batch():` leaves on an error too, the error kept. */
    PyObject *type, *value, *tb, *r;
    PyErr_Fetch(&type, &value, &tb);
    r = fb_batch_exit((CompletionPortObject*)port, NULL);
    if (r == NULL) {
      Py_CLEAR(done);
      if (type != NULL) {
        PyErr_Clear();
        PyErr_Restore(type, value, tb);
      }
    } else {
      Py_DECREF(r);
      if (type != NULL) PyErr_Restore(type, value, tb);
    }
  }
  Py_DECREF(port);
  return done;
}

static PyObject* py_proactor_select(PyObject* module, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs < 1 || nargs > 2) {
    PyErr_SetString(PyExc_TypeError, "_proactor_select(proactor, timeout=None)");
    return NULL;
  }
  return proactor_select(args[0], nargs > 1 ? args[1] : Py_None);
}

/* ---- _LoopCore methods ------------------------------------------------ */

static PyObject* LoopCore_call_soon(LoopCoreObject* self, PyObject* const* args, size_t nargsf,
                                    PyObject* kwnames) {
  Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
  PyObject *context, *t, *h;
  int fast;
  if (nargs < 1) {
    PyErr_SetString(PyExc_TypeError, "call_soon() missing required argument 'callback'");
    return NULL;
  }
  if (parse_context("call_soon", args, nargs, kwnames, &context) < 0) return NULL;
  fast = fast_path(self);
  if (fast < 0) return NULL;
  if (!fast) return call_base(base_call_soon, (PyObject*)self, NULL, args, nargsf, kwnames);
  if (check_closed(self) < 0) return NULL;
  t = args_tuple(args, nargs, 1);
  if (t == NULL) return NULL;
  h = handle_new(handle_type, self, args[0], t, context);
  if (h == NULL) return NULL;
  if (ready_append(self, h) < 0) Py_CLEAR(h);
  return h;
}

/* call_at's work once when is known; args[0] is the callback. */
static PyObject* schedule_at(LoopCoreObject* self, PyObject* when, PyObject* const* args,
                             Py_ssize_t nargs, PyObject* context) {
  PyObject *t, *h;
  if (self->scheduled == NULL || !PyList_CheckExact(self->scheduled)) {
    PyErr_SetString(PyExc_TypeError, "loop._scheduled is not a list");
    return NULL;
  }
  t = args_tuple(args, nargs, 1);
  if (t == NULL) return NULL;
  h = handle_new(timer_handle_type, self, args[0], t, context);
  if (h == NULL) return NULL;
  SLOT(h, m_when) = Py_NewRef(when);
  SLOT(h, m_scheduled) = Py_NewRef(Py_False);
  if (heap_push(self->scheduled, h) < 0 || set_scheduled(h, Py_True) < 0) Py_CLEAR(h);
  return h;
}

/* Whether when is a number the heap compares in C: a float or an int. */
static int plain_number(PyObject* when) {
  return PyFloat_CheckExact(when) || PyLong_CheckExact(when);
}

static PyObject* LoopCore_call_at(LoopCoreObject* self, PyObject* const* args, size_t nargsf,
                                  PyObject* kwnames) {
  Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
  PyObject* context;
  int fast;
  if (nargs < 2) {
    PyErr_SetString(PyExc_TypeError, "call_at() missing required arguments 'when' and 'callback'");
    return NULL;
  }
  if (parse_context("call_at", args, nargs, kwnames, &context) < 0) return NULL;
  if (args[0] == Py_None) {
    PyErr_SetString(PyExc_TypeError, "when cannot be None");
    return NULL;
  }
  fast = fast_path(self);
  if (fast < 0) return NULL;
  if (!fast || !plain_number(args[0]))
    return call_base(base_call_at, (PyObject*)self, NULL, args, nargsf, kwnames);
  if (check_closed(self) < 0) return NULL;
  return schedule_at(self, args[0], args + 1, nargs - 1, context);
}

static PyObject* LoopCore_call_later(LoopCoreObject* self, PyObject* const* args, size_t nargsf,
                                     PyObject* kwnames) {
  Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
  PyObject *context, *now, *when, *res;
  int fast;
  if (nargs < 2) {
    PyErr_SetString(PyExc_TypeError,
                    "call_later() missing required arguments 'delay' and 'callback'");
    return NULL;
  }
  if (parse_context("call_later", args, nargs, kwnames, &context) < 0) return NULL;
  if (args[0] == Py_None) {
    PyErr_SetString(PyExc_TypeError, "delay must not be None");
    return NULL;
  }
  now = PyObject_CallMethodNoArgs((PyObject*)self, str_time);
  if (now == NULL) return NULL;
  when = PyNumber_Add(now, args[0]);
  Py_DECREF(now);
  if (when == NULL) return NULL;
  fast = fast_path(self);
  if (fast < 0 || (fast && check_closed(self) < 0)) {
    res = NULL;
  } else if (!fast || !plain_number(when)) {
    /* The stdlib's call_at(when, callback, *args, context=context). */
    res = call_base(base_call_at, (PyObject*)self, when, args, (size_t)nargs, kwnames);
  } else {
    res = schedule_at(self, when, args + 1, nargs - 1, context);
  }
  Py_DECREF(when);
  return res;
}

/* BaseEventLoop.get_debug(): Future() asks it at every creation. */
static PyObject* LoopCore_get_debug(LoopCoreObject* self, PyObject* unused) {
  if (self->debug == NULL) {
    PyErr_SetString(PyExc_AttributeError, "'_debug'");
    return NULL;
  }
  return Py_NewRef(self->debug);
}

/* BaseEventLoop.create_future(): futures.Future(loop=self), without the two
 * Python frames (it and get_debug) a StreamReader pays per read. */
static PyObject* LoopCore_create_future(LoopCoreObject* self, PyObject* unused) {
  PyObject* args[1] = {(PyObject*)self};
  if (future_type == NULL) {
    PyErr_SetString(PyExc_RuntimeError, "_loop_core_setup() has not run");
    return NULL;
  }
  return PyObject_Vectorcall(future_type, args, 0, kw_loop);
}

/* BaseEventLoop.create_task(coro, *, name=None, context=None): with no
 * task factory and debug off, Task(coro, loop=self, name=..., context=...)
 * without its Python frames (a server makes a task per request); else
 * the stdlib's method. */
static PyObject* LoopCore_create_task(LoopCoreObject* self, PyObject* const* args, size_t nargsf,
                                      PyObject* kwnames) {
  Py_ssize_t nargs = PyVectorcall_NARGS(nargsf), nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0, i;
  PyObject *factory, *stack[4], *names, *task;
  int fast;
  if (nargs != 1) {
    PyErr_Format(PyExc_TypeError, "create_task() takes 1 positional argument but %zd were given",
                 nargs);
    return NULL;
  }
  if (nkw > 2) { /* name and context at most: stack[] holds coro, loop and those */
    PyErr_SetString(PyExc_TypeError, "create_task() takes at most 2 keyword arguments");
    return NULL;
  }
  for (i = 0; i < nkw; i++) {
    PyObject* k = PyTuple_GET_ITEM(kwnames, i);
    if (!PyUnicode_Check(k) || (PyUnicode_CompareWithASCIIString(k, "name") != 0
#if PY_VERSION_HEX >= 0x030B0000
                                && PyUnicode_CompareWithASCIIString(k, "context") != 0
#endif
                                    )) {
      PyErr_Format(PyExc_TypeError, "create_task() got an unexpected keyword argument '%S'", k);
      return NULL;
    }
  }
  if (base_create_task == NULL || task_type == NULL) {
    PyErr_SetString(PyExc_RuntimeError, "_loop_core_setup() has not run");
    return NULL;
  }
  fast = fast_path(self);
  if (fast < 0) return NULL;
  if (!fast) return call_base(base_create_task, (PyObject*)self, NULL, args, nargsf, kwnames);
  factory = PyObject_GetAttr((PyObject*)self, str_task_factory);
  if (factory == NULL) return NULL;
  Py_DECREF(factory); /* only whether it is None */
  if (factory != Py_None)
    return call_base(base_create_task, (PyObject*)self, NULL, args, nargsf, kwnames);
  if (check_closed(self) < 0) return NULL;
  /* Task(coro, loop=self, <the keywords given>) */
  stack[0] = args[0];
  stack[1] = (PyObject*)self;
  for (i = 0; i < nkw; i++) stack[2 + i] = args[1 + i];
  if (nkw == 0) {
    names = Py_NewRef(kw_loop);
  } else {
    names = PyTuple_New(1 + nkw);
    if (names == NULL) return NULL;
    PyTuple_SET_ITEM(names, 0, Py_NewRef(PyTuple_GET_ITEM(kw_loop, 0)));
    for (i = 0; i < nkw; i++) PyTuple_SET_ITEM(names, 1 + i, Py_NewRef(PyTuple_GET_ITEM(kwnames, i)));
  }
  task = PyObject_Vectorcall(task_type, stack, 1, names);
  Py_DECREF(names);
  return task;
}

/* BaseEventLoop._timer_handle_cancelled(handle), which TimerHandle.cancel()
 * calls: a scheduled timer counts as cancelled (the heap drops cancelled
 * timers when they are too many). A server cancelling a timeout per
 * request made this Python call each time. */
static PyObject* LoopCore_timer_handle_cancelled(LoopCoreObject* self, PyObject* handle) {
  PyObject* scheduled;
  int is;
  if (ready_to_go && PyObject_TypeCheck(handle, timer_handle_type))
    scheduled = PyMember_GetOne((const char*)handle, m_scheduled);
  else
    scheduled = PyObject_GetAttrString(handle, "_scheduled");
  if (scheduled == NULL) return NULL;
  is = PyObject_IsTrue(scheduled);
  Py_DECREF(scheduled);
  if (is < 0) return NULL;
  if (is) self->timer_cancelled_count++;
  Py_RETURN_NONE;
}

/* 1 if self._process_events is BaseProactorEventLoop's, which does nothing
 * (its proactor finishes the futures in select()): the call is left out,
 * one Python frame per iteration. 0 if a subclass or the instance gave it
 * another, -1 with an exception. */
static int process_events_is_noop(LoopCoreObject* self) {
  PyObject* m = PyObject_GetAttr((PyObject*)self, str_process_events);
  int noop;
  if (m == NULL) return -1;
  noop = PyMethod_Check(m) && PyMethod_GET_FUNCTION(m) == base_process_events &&
         PyMethod_GET_SELF(m) == (PyObject*)self;
  Py_DECREF(m);
  return noop;
}

static PyObject* LoopCore_time(LoopCoreObject* self, PyObject* unused) {
  double d = monotonic_now();
  if (d == -1.0 && PyErr_Occurred()) return NULL;
  return PyFloat_FromDouble(d);
}

/* Drops cancelled timers: all of them if they are too many (a new heap),
 * else those at the top. BaseEventLoop._run_once's first step. */
static int drop_cancelled_timers(LoopCoreObject* self) {
  PyObject* heap = self->scheduled;
  Py_ssize_t n = PyList_GET_SIZE(heap), i;
  if (n > MIN_SCHEDULED_TIMER_HANDLES &&
      (double)self->timer_cancelled_count / (double)n > MIN_CANCELLED_TIMER_HANDLES_FRACTION) {
    PyObject* kept = PyList_New(0);
    if (kept == NULL) return -1;
    for (i = 0; i < PyList_GET_SIZE(heap); i++) {
      PyObject* h = PyList_GET_ITEM(heap, i);
      int cancelled = timer_cancelled(h);
      if (cancelled < 0 || (cancelled ? set_scheduled(h, Py_False) : PyList_Append(kept, h)) < 0) {
        Py_DECREF(kept);
        return -1;
      }
    }
    for (i = PyList_GET_SIZE(kept) / 2 - 1; i >= 0; i--) {
      if (heap_sift_up(kept, i) < 0) {
        Py_DECREF(kept);
        return -1;
      }
    }
    Py_SETREF(self->scheduled, kept);
    self->timer_cancelled_count = 0;
    return 0;
  }
  while (PyList_GET_SIZE(self->scheduled) > 0) {
    int cancelled = timer_cancelled(PyList_GET_ITEM(self->scheduled, 0));
    PyObject* h;
    if (cancelled <= 0) return cancelled;
    self->timer_cancelled_count--;
    h = heap_pop(self->scheduled);
    if (h == NULL) return -1;
    cancelled = set_scheduled(h, Py_False);
    Py_DECREF(h);
    if (cancelled < 0) return -1;
  }
  return 0;
}

static PyObject* LoopCore_run_once(LoopCoreObject* self, PyObject* unused) {
  PyObject *timeout, *events, *r;
  Py_ssize_t ntodo, i;
  int fast = fast_path(self), stopping;
  if (fast < 0) return NULL;
  if (!fast || self->ready == NULL || self->selector == NULL || self->stopping == NULL ||
      self->scheduled == NULL || !PyList_CheckExact(self->scheduled)) {
    PyObject* me = (PyObject*)self;
    return PyObject_Vectorcall(base_run_once, &me, 1, NULL);
  }
  if (drop_cancelled_timers(self) < 0) return NULL;

  /* The wait: none if something is ready or the loop stops, else until the
   * first timer, else forever. */
  ntodo = PyObject_Size(self->ready);
  if (ntodo < 0) return NULL;
  stopping = self->stopping == Py_False ? 0 : PyObject_IsTrue(self->stopping);
  if (stopping < 0) return NULL;
  if (ntodo > 0 || stopping) {
    timeout = PyFloat_FromDouble(0.0);
  } else if (PyList_GET_SIZE(self->scheduled) > 0) {
    int ok = 1;
    double first = when_of(PyList_GET_ITEM(self->scheduled, 0), &ok), now, t;
    if (!ok) return NULL;
    now = loop_time(self);
    if (now == -1.0 && PyErr_Occurred()) return NULL;
    t = first - now;
    if (t > MAXIMUM_SELECT_TIMEOUT) t = MAXIMUM_SELECT_TIMEOUT;
    else if (t < 0) t = 0;
    timeout = PyFloat_FromDouble(t);
  } else {
    timeout = Py_NewRef(Py_None);
  }
  if (timeout == NULL) return NULL;
  {
    PyObject* selector = Py_NewRef(self->selector);
    if (Py_TYPE(selector) == proactor_type) {
      events = proactor_select(selector, timeout);
    } else {
      PyObject* call[2] = {selector, timeout};
      events = PyObject_VectorcallMethod(str_select, call, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                         NULL);
    }
    Py_DECREF(selector);
  }
  Py_DECREF(timeout);
  if (events == NULL) return NULL;
  {
    int noop = process_events_is_noop(self);
    r = NULL;
    if (noop == 0) {
      PyObject* call[2] = {(PyObject*)self, events};
      r = PyObject_VectorcallMethod(str_process_events, call, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                    NULL);
      Py_XDECREF(r);
    }
    Py_DECREF(events);
    if (noop < 0 || (noop == 0 && r == NULL)) return NULL;
  }

  /* Timers due within the clock's resolution join the ready queue. */
  if (self->scheduled == NULL || !PyList_CheckExact(self->scheduled)) {
    PyErr_SetString(PyExc_TypeError, "loop._scheduled is not a list");
    return NULL;
  }
  if (PyList_GET_SIZE(self->scheduled) > 0) {
    double end_time = loop_time(self);
    if (end_time == -1.0 && PyErr_Occurred()) return NULL;
    end_time += self->clock_resolution;
    while (PyList_GET_SIZE(self->scheduled) > 0) {
      int ok = 1;
      double w = when_of(PyList_GET_ITEM(self->scheduled, 0), &ok);
      PyObject* h;
      if (!ok) return NULL;
      if (w >= end_time) break;
      h = heap_pop(self->scheduled);
      if (h == NULL) return NULL;
      if (set_scheduled(h, Py_False) < 0 || ready_append(self, h) < 0) {
        Py_DECREF(h);
        return NULL;
      }
      Py_DECREF(h);
    }
  }

  /* The callbacks ready now; those they schedule run next time. */
  ntodo = PyObject_Size(self->ready);
  if (ntodo < 0) return NULL;
  for (i = 0; i < ntodo; i++) {
    PyObject* call[1] = {self->ready};
    PyObject *h, *c;
    int cancelled;
    h = PyObject_VectorcallMethod(str_popleft, call, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (h == NULL) return NULL;
    if (Py_TYPE(h) == handle_type || Py_TYPE(h) == timer_handle_type) {
      c = PyMember_GetOne((const char*)h, m_cancelled);
    } else {
      c = PyObject_GetAttrString(h, "_cancelled");
    }
    cancelled = c == NULL ? -1 : (c == Py_False ? 0 : PyObject_IsTrue(c));
    Py_XDECREF(c);
    if (cancelled == 0) cancelled = handle_run(self, h);
    Py_DECREF(h);
    if (cancelled < 0) return NULL;
  }
  Py_RETURN_NONE;
}

/* ---- setup ------------------------------------------------------------ */

/* loop.h */
PyMemberDef* fb_object_slot(PyObject* descr) {
  PyMemberDef* m;
  if (!Py_IS_TYPE(descr, &PyMemberDescr_Type)) return NULL;
  m = ((PyMemberDescrObject*)descr)->d_member;
  if (m == NULL || m->type != T_OBJECT_EX || (m->flags & READONLY)) return NULL;
#ifdef Py_RELATIVE_OFFSET
  if (m->flags & Py_RELATIVE_OFFSET) return NULL;
#endif
  return m;
}

/* The PyMemberDef behind cls.name, an object slot; NULL with an exception. */
static PyMemberDef* slot_of(PyTypeObject* cls, const char* name) {
  PyObject* d = PyObject_GetAttrString((PyObject*)cls, name);
  PyMemberDef* m;
  if (d == NULL) return NULL;
  m = fb_object_slot(d);
  Py_DECREF(d); /* the class keeps the descriptor alive */
  if (m == NULL)
    PyErr_Format(PyExc_TypeError, "%s.%s is not a writable object slot", cls->tp_name, name);
  return m;
}

static PyObject* loop_core_setup(PyObject* module, PyObject* args) {
  PyObject *handle, *timer, *base, *proactor, *cont;
  if (!PyArg_ParseTuple(args, "O!O!OO!O:_loop_core_setup", &PyType_Type, &handle, &PyType_Type,
                        &timer, &base, &PyType_Type, &proactor, &cont))
    return NULL;
  if (proactor_type == NULL) {
    proactor_type = (PyTypeObject*)Py_NewRef(proactor);
    continued = Py_NewRef(cont);
  }
#ifndef __linux__
#if PY_VERSION_HEX < 0x030D0000
  /* time() needs it whatever the handles' shape. */
  if (monotonic_fn == NULL) {
    PyObject* time_mod = PyImport_ImportModule("time");
    if (time_mod == NULL) return NULL;
    monotonic_fn = PyObject_GetAttrString(time_mod, "monotonic");
    Py_DECREF(time_mod);
    if (monotonic_fn == NULL) return NULL;
  }
#endif
#endif
  if (future_type == NULL) {
    PyObject *futures = PyImport_ImportModule("asyncio.futures"), *tasks, *fut = NULL, *task = NULL;
    PyObject *noop = NULL, *create = NULL;
    tasks = futures ? PyImport_ImportModule("asyncio.tasks") : NULL;
    if (tasks != NULL) {
      fut = PyObject_GetAttrString(futures, "Future");
      task = fut ? PyObject_GetAttrString(tasks, "Task") : NULL;
      noop = task ? PyObject_GetAttrString(base, "_process_events") : NULL;
      create = noop ? PyObject_GetAttrString(base, "create_task") : NULL;
      if (create != NULL) kw_loop = Py_BuildValue("(s)", "loop");
    }
    Py_XDECREF(futures);
    Py_XDECREF(tasks);
    if (kw_loop == NULL) {
      Py_XDECREF(fut);
      Py_XDECREF(task);
      Py_XDECREF(noop);
      Py_XDECREF(create);
      return NULL;
    }
    future_type = fut;
    task_type = task;
    base_process_events = noop;
    base_create_task = create;
  }
  if (ready_to_go) Py_RETURN_TRUE;
  if (!PyType_IsSubtype((PyTypeObject*)timer, (PyTypeObject*)handle) ||
      ((PyTypeObject*)handle)->tp_alloc == NULL) {
    PyErr_SetString(PyExc_TypeError, "TimerHandle is not a Handle");
    return NULL;
  }
  m_callback = slot_of((PyTypeObject*)handle, "_callback");
  m_args = m_callback ? slot_of((PyTypeObject*)handle, "_args") : NULL;
  m_cancelled = m_args ? slot_of((PyTypeObject*)handle, "_cancelled") : NULL;
  m_loop = m_cancelled ? slot_of((PyTypeObject*)handle, "_loop") : NULL;
  m_source_tb = m_loop ? slot_of((PyTypeObject*)handle, "_source_traceback") : NULL;
  m_repr = m_source_tb ? slot_of((PyTypeObject*)handle, "_repr") : NULL;
  m_context = m_repr ? slot_of((PyTypeObject*)handle, "_context") : NULL;
  m_when = m_context ? slot_of((PyTypeObject*)timer, "_when") : NULL;
  m_scheduled = m_when ? slot_of((PyTypeObject*)timer, "_scheduled") : NULL;
  if (m_scheduled == NULL) {
    /* The stdlib's classes differ from what this file fills in: the loop
     * runs on the stdlib's methods. */
    PyErr_Clear();
    Py_RETURN_FALSE;
  }
  base_call_soon = PyObject_GetAttrString(base, "call_soon");
  base_call_at = base_call_soon ? PyObject_GetAttrString(base, "call_at") : NULL;
  base_run_once = base_call_at ? PyObject_GetAttrString(base, "_run_once") : NULL;
  if (base_run_once == NULL) return NULL;
  handle_type = (PyTypeObject*)Py_NewRef(handle);
  timer_handle_type = (PyTypeObject*)Py_NewRef(timer);
  ready_to_go = 1;
  Py_RETURN_TRUE;
}

/* ---- the type --------------------------------------------------------- */

static int LoopCore_traverse(LoopCoreObject* self, visitproc visit, void* arg) {
  Py_VISIT(self->ready);
  Py_VISIT(self->scheduled);
  Py_VISIT(self->stopping);
  Py_VISIT(self->debug);
  Py_VISIT(self->closed);
  Py_VISIT(self->selector);
  return 0;
}

static int LoopCore_clear(LoopCoreObject* self) {
  Py_CLEAR(self->ready);
  Py_CLEAR(self->scheduled);
  Py_CLEAR(self->stopping);
  Py_CLEAR(self->debug);
  Py_CLEAR(self->closed);
  Py_CLEAR(self->selector);
  return 0;
}

static void LoopCore_dealloc(LoopCoreObject* self) {
  PyObject_GC_UnTrack(self);
  LoopCore_clear(self);
  Py_TYPE(self)->tp_free((PyObject*)self);
}

#define FASTKW_METHOD(f) (PyCFunction)(void (*)(void))(f), METH_FASTCALL | METH_KEYWORDS

static PyMethodDef LoopCore_methods[] = {
    {"call_soon", FASTKW_METHOD(LoopCore_call_soon),
     "call_soon($self, callback, /, *args, context=None)\n--\n\n"
     "Arrange for callback(*args) to be called soon, in the order of the calls (a Handle)."},
    {"call_at", FASTKW_METHOD(LoopCore_call_at),
     "call_at($self, when, callback, /, *args, context=None)\n--\n\n"
     "Arrange for callback(*args) to be called at loop time when (a TimerHandle)."},
    {"call_later", FASTKW_METHOD(LoopCore_call_later),
     "call_later($self, delay, callback, /, *args, context=None)\n--\n\n"
     "Arrange for callback(*args) to be called after delay seconds (a TimerHandle)."},
    {"get_debug", (PyCFunction)LoopCore_get_debug, METH_NOARGS,
     "get_debug($self, /)\n--\n\nWhether the loop is in debug mode (its _debug)."},
    {"create_future", (PyCFunction)LoopCore_create_future, METH_NOARGS,
     "create_future($self, /)\n--\n\nA new asyncio.Future attached to the loop."},
    {"_timer_handle_cancelled", (PyCFunction)LoopCore_timer_handle_cancelled, METH_O,
     "_timer_handle_cancelled($self, handle, /)\n--\n\n"
     "Notification that a TimerHandle has been cancelled (counted if it is scheduled)."},
    {"create_task", FASTKW_METHOD(LoopCore_create_task),
     "create_task($self, coro, /, *, name=None, context=None)\n--\n\n"
     "Schedule the execution of the coroutine coro (an asyncio.Task)."},
    {"time", (PyCFunction)LoopCore_time, METH_NOARGS,
     "time($self, /)\n--\n\nThe loop's clock: time.monotonic()."},
    {"_run_once", (PyCFunction)LoopCore_run_once, METH_NOARGS,
     "_run_once($self, /)\n--\n\nOne iteration of the loop: wait for I/O or the first timer, "
     "then run the ready callbacks."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef LoopCore_members[] = {
    {"_ready", T_OBJECT_EX, offsetof(LoopCoreObject, ready), 0, NULL},
    {"_scheduled", T_OBJECT_EX, offsetof(LoopCoreObject, scheduled), 0, NULL},
    {"_stopping", T_OBJECT_EX, offsetof(LoopCoreObject, stopping), 0, NULL},
    {"_debug", T_OBJECT_EX, offsetof(LoopCoreObject, debug), 0, NULL},
    {"_closed", T_OBJECT_EX, offsetof(LoopCoreObject, closed), 0, NULL},
    {"_selector", T_OBJECT_EX, offsetof(LoopCoreObject, selector), 0, NULL},
    {"_timer_cancelled_count", T_PYSSIZET, offsetof(LoopCoreObject, timer_cancelled_count), 0,
     NULL},
    {"_clock_resolution", T_DOUBLE, offsetof(LoopCoreObject, clock_resolution), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

PyTypeObject fb_LoopCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fastiocp._fastiocp._LoopCore",
    .tp_basicsize = sizeof(LoopCoreObject),
    .tp_dealloc = (destructor)LoopCore_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The scheduling of fastiocp's asyncio loop in C: a base of EventLoop.",
    .tp_traverse = (traverseproc)LoopCore_traverse,
    .tp_clear = (inquiry)LoopCore_clear,
    .tp_methods = LoopCore_methods,
    .tp_members = LoopCore_members,
    .tp_new = PyType_GenericNew,
};

static PyMethodDef setup_def = {
    "_loop_core_setup", (PyCFunction)loop_core_setup, METH_VARARGS,
    "_loop_core_setup(handle, timer_handle, base_loop, proactor, continued, /)\n--\n\n"
    "Tells _LoopCore the stdlib's classes (base_loop: BaseProactorEventLoop) and the loop's "
    "proactor class. False if the handles' slots are not the expected ones (the loop then runs "
    "on the stdlib's methods)."};

static PyMethodDef select_def = {
    "_proactor_select", (PyCFunction)(void (*)(void))py_proactor_select, METH_FASTCALL,
    "_proactor_select(proactor, timeout=None, /)\n--\n\n"
    "PortProactor.select(): waits, then finishes what completed; the futures finished."};

int fb_loop_core_init(PyObject* module) {
  struct {
    PyObject** slot;
    const char* text;
  } names[] = {
      {&str_append, "append"},         {&str_popleft, "popleft"},
      {&str_select, "select"},         {&str_process_events, "_process_events"},
      {&str_time, "time"},             {&str_run, "_run"},
      {&str_context, "context"},       {&str_report_handle_error, "_report_handle_error"},
      {&str_backlog, "_backlog"},      {&str_port, "_port"},
      {&str_pending, "_pending"},      {&str_loop, "_loop"},
      {&str_get_many, "get_many"},     {&str_done, "done"},
      {&str_cancel, "cancel"},         {&str_set_exception, "set_exception"},
      {&str_set_result, "set_result"}, {&str_call_exception_handler, "call_exception_handler"},
      {&str_task_factory, "_task_factory"},
  };
  size_t i;
  PyObject* fn;
  for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
    if (*names[i].slot == NULL) {
      *names[i].slot = PyUnicode_InternFromString(names[i].text);
      if (*names[i].slot == NULL) return -1;
    }
  }
  if (PyType_Ready(&fb_LoopCoreType) < 0) return -1;
  if (PyModule_AddObjectRef(module, "_LoopCore", (PyObject*)&fb_LoopCoreType) < 0) return -1;
  fn = PyCFunction_NewEx(&setup_def, NULL, NULL);
  if (fn == NULL) return -1;
  if (PyModule_AddObject(module, "_loop_core_setup", fn) < 0) {
    Py_DECREF(fn);
    return -1;
  }
  fn = PyCFunction_NewEx(&select_def, NULL, NULL);
  if (fn == NULL) return -1;
  if (PyModule_AddObject(module, "_proactor_select", fn) < 0) {
    Py_DECREF(fn);
    return -1;
  }
  return 0;
}
