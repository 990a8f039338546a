/* loop.h: the asyncio loop's C fast path (csrc/loop/), as the module sees it. */
#ifndef FIOCP_LOOP_H
#define FIOCP_LOOP_H

#include "../binding/binding.h"

#include <structmember.h> /* PyMember_GetOne, T_OBJECT_EX: __slots__ read from C */

extern PyTypeObject fb_ReadLoopType;
extern PyTypeObject fb_SocketWriteType;
extern PyTypeObject fb_RingWriteType;
extern PyTypeObject fb_LoopCoreType;

/* The PyMemberDef of descr when it is a member descriptor of a writable
 * object slot (__slots__), else NULL (no exception). core.c. */
PyMemberDef* fb_object_slot(PyObject* descr);

/* Adds _LoopCore and _loop_core_setup (core.c). 0, or -1 with an exception. */
int fb_loop_core_init(PyObject* module);

/* Adds the loop's types to the module. Returns 0, or -1 with an exception. */
int fb_loop_init(PyObject* module);

#endif
