/* bcryptprimitives.dll for Wine 8, which has none (Wine 9 added it).
 *
 * Rust's standard library (1.78 and later) imports ProcessPrng from it for
 * its random numbers, so every Rust-built extension module (cryptography's
 * _rust.pyd, for instance) fails under Wine 8 with "DLL load failed ...
 * Module not found". tools/wine/test.sh builds this file with mingw-w64 and
 * puts the DLL beside python.exe. ProcessPrng fills the buffer from the
 * system RNG and, as Windows documents it, always returns TRUE (if the
 * system RNG ever failed, the process ends rather than go on unseeded). */
#include <windows.h>
#include <bcrypt.h>

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len) {
  while (len > 0) {
    ULONG n = len > 0x40000000 ? 0x40000000 : (ULONG)len;
    if (!BCRYPT_SUCCESS(BCryptGenRandom(NULL, data, n, BCRYPT_USE_SYSTEM_PREFERRED_RNG)))
      TerminateProcess(GetCurrentProcess(), 3);
    data += n;
    len -= n;
  }
  return TRUE;
}
