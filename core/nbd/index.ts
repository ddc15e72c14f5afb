/**
 * The NBD layer's public surface. The engine implements NbdExport; the CLI builds an
 * NbdServer around it and calls listen() / serveFd() / stop().
 */
export { ERRNO, NbdExportError, type NbdExport } from "./export.ts";
export { MemoryExport, type MemoryExportOptions, type MemoryOp } from "./memory_export.ts";
export { stderrLogger, silentLogger, type NbdLogger, type NbdLogLevel } from "./logger.ts";
export { DEFAULT_CONNECTION_LIMITS, type ConnectionLimits } from "./connection.ts";
export {
  NbdServer,
  parseListenAddress,
  socketActivationFd,
  DEFAULT_LISTEN_ADDRESS,
  DEFAULT_NBD_HOST,
  DEFAULT_NBD_PORT,
  SD_LISTEN_FDS_START,
  type ListenAddress,
  type ListenInfo,
  type NbdServerOptions,
} from "./server.ts";
export { STATE_HOLE, STATE_ZERO } from "./wire.ts";
