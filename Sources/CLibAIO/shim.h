#ifndef SCSIGATE_CLIBAIO_SHIM_H
#define SCSIGATE_CLIBAIO_SHIM_H
#include <libaio.h>
#endif
