/* loop.h: the asyncio loop's C fast path (csrc/loop/), as the module sees it. */
#ifndef FIOCP_LOOP_H
#define FIOCP_LOOP_H

#include "../binding/binding.h"

extern PyTypeObject fb_ReadLoopType;
extern PyTypeObject fb_SocketWriteType;
extern PyTypeObject fb_RingWriteType;
extern PyTypeObject fb_LoopCoreType;

/* Adds _LoopCore and _loop_core_setup (core.c). 0, or -1 with an exception. */
int fb_loop_core_init(PyObject* module);

/* Adds the loop's types to the module. Returns 0, or -1 with an exception. */
int fb_loop_init(PyObject* module);

#endif
