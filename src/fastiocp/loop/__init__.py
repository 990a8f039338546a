"""fastiocp's asyncio event loop: an unchanged asyncio program on a
completion port (IOCP on Windows, io_uring or epoll on Linux).

    asyncio.run(main(), loop_factory=fastiocp.new_event_loop)   # 3.12+
    fastiocp.run(main())                                        # any version
    uvicorn app:app --loop fastiocp:new_event_loop

One loop per thread, as for every asyncio loop; any number of threads may
each run their own."""
from ._loop import EventLoop, EventLoopPolicy, new_event_loop, run

__all__ = ["EventLoop", "EventLoopPolicy", "new_event_loop", "run"]
