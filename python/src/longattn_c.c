/* The one source of liblongattn_c.so: the library's content is the whole static archive linked in
 * (python/CMakeLists.txt); this file only pins the header the Python bindings mirror. */
#include "longattn/longattn.h"

typedef char longattn_python_bindings_expect_abi_1[LONGATTN_ABI_VERSION == 1 ? 1 : -1];
